# kdcli: `make install`, `make test`, then `make smoke` or `make paper`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
KDCLI   = $(BIN)/kdcli
# torch/torchvision versions the suite is tested with; override for another platform
TORCH  ?= torch==2.14.1 torchvision==0.29.1
SEEDS  ?= 1
# `make paper PRECISION=bf16`: every run with bfloat16 matmuls (faster on CPUs with AMX/AVX512-BF16 and on
# CUDA); empty keeps each experiment file's own precision (fp32, with which results/ was made)
PRECISION ?=
PRECISION_FLAG = $(if $(PRECISION),--precision $(PRECISION))
# `make paper RAY=auto`: every run as a Ray task on the running cluster (RAY=HOST:PORT: another one; RAY=local:
# a Ray started here for each run), in the same dependency order; RAY_FLAGS="--cpus-per-run 2 --gpus-per-run 1"
# sets what each run asks for, --ship-runs sends every run back through Ray (README, "On a Ray cluster")
RAY ?=
RAY_FLAGS ?=
ON_RAY = $(if $(RAY),$(strip ray-run --ray $(RAY) $(RAY_FLAGS)) -- )
SWEEP_ON_RAY = $(if $(RAY),--ray $(RAY) $(RAY_FLAGS))
# The shared data folder of this project's machines, when present; else kdcli's own lookup
# ($$KDCLI_DATA_DIR, then the cache, then torchvision's downloader).
ifneq ($(wildcard ../shared/data/mnist),)
export KDCLI_DATA_DIR ?= $(abspath ../shared/data)
endif


.PHONY: install test smoke bench gpu-check bench-runs paper teacher teachers student distill tsweep data3pct report clean ensembles jitter specialists specialists-fashion specialists-mnist omit3 only78 clean-runs

# Paper reproduction: each run is a file target on its result.json, so an
# interrupted `make paper` picks up where it stopped (an interrupted run resumes).
# `make paper SEEDS=3` adds seeds 2 and 3 of every row: the teacher, student, distilled, 3%, T-sweep and omitted-digit rows.
# `make paper EXP=experiments/smoke RUNS=smoke-runs RESULTS=smoke-results` is the pipeline's smoke test.
EXP     ?= experiments
RUNS    ?= runs
RESULTS ?= results
EXTRA_SEEDS := $(wordlist 2,$(SEEDS),1 2 3 4 5 6 7 8 9 10)
start = $(if $(wildcard $(1)/resume.pt),--resume,--force)

# Teachers. Every row distils from teacher k for seed k: the released teachers under teachers/ (RELEASE-s1..s3,
# `kdcli teachers` lists them) when they are there, else teachers trained here first. `make paper TEACHERS=scratch`
# (or `make teachers`) retrains them from nothing with experiments/teacher.yaml, the released recipe, into $(RUNS)/.
RELEASE  ?= mnist-1200
TEACHERS_DIR ?= teachers
# released only when every seed asked for is: a partial release (seed 1 alone) trains them all here instead
RELEASED_SEEDS = $(strip $(foreach s,1 2 3,$(if $(wildcard $(TEACHERS_DIR)/$(RELEASE)-s$(s)/SHA256SUMS),$(s))))
UNRELEASED_SEEDS = $(filter-out $(RELEASED_SEEDS),1 $(EXTRA_SEEDS))
TEACHERS ?= $(if $(RELEASED_SEEDS),$(if $(UNRELEASED_SEEDS),scratch,released),scratch)
ifeq ($(origin TEACHERS)$(TEACHERS),filescratch)
ifneq ($(RELEASED_SEEDS),)
$(info kdcli: no released teacher for seed $(firstword $(UNRELEASED_SEEDS)) in $(TEACHERS_DIR)/: training every teacher here (TEACHERS=scratch))
endif
endif
ifeq ($(TEACHERS),released)
teacher_of  = $(TEACHERS_DIR)/$(RELEASE)-s$(1)
teacher_dep =
REPORT_TEACHERS = --teachers $(TEACHERS_DIR)/$(RELEASE)
ifneq ($(filter-out 1 2 3,$(SEEDS:%=%)),)
$(error kdcli releases teachers for seeds 1-3: for SEEDS=$(SEEDS) train them here with TEACHERS=scratch)
endif
ifneq ($(UNRELEASED_SEEDS),)
$(error no released teacher for seed $(firstword $(UNRELEASED_SEEDS)) in $(TEACHERS_DIR)/: train them here with TEACHERS=scratch)
endif
else ifeq ($(TEACHERS),scratch)
teacher_of  = $(RUNS)/teacher$(if $(filter-out 1,$(1)),-s$(1))
teacher_dep = $(RUNS)/teacher$(if $(filter-out 1,$(1)),-s$(1))/result.json
REPORT_TEACHERS =
else
$(error TEACHERS must be released or scratch, got '$(TEACHERS)')
endif

# $(1) run name, $(2) command, $(3) experiment file stem, $(4) extra flags, $(5) prerequisites
define RUN
$(RUNS)/$(1)/result.json: $(5)
	$(KDCLI) $(ON_RAY)$(2) -c $(EXP)/$(3).yaml --out $(RUNS)/$(1) $(4) $(PRECISION_FLAG) $$(call start,$(RUNS)/$(1))
endef
$(eval $(call RUN,teacher,train-teacher,teacher,,))
$(eval $(call RUN,student,train-teacher,student,,))
# each distilled row and its jittered twin (`make jitter`, at the end) share one definition
$(foreach d,distill distill-jitter,$(eval $(call RUN,$(d),distill,$(d),--teacher $(call teacher_of,1),$(call teacher_dep,1))))
$(foreach s,$(sort 2 3 $(EXTRA_SEEDS)),$(eval $(call RUN,teacher-s$(s),train-teacher,teacher,--seed $(s),)))
$(foreach s,$(EXTRA_SEEDS),$(eval $(call RUN,student-s$(s),train-teacher,student,--seed $(s),)))
$(foreach d,distill distill-jitter,$(foreach s,$(EXTRA_SEEDS),$(eval $(call RUN,$(d)-s$(s),distill,$(d),--seed $(s) --teacher $(call teacher_of,$(s)),$(call teacher_dep,$(s))))))
$(eval $(call RUN,data3pct-hard,train-teacher,data3pct-hard,,))
$(eval $(call RUN,data3pct-hard-es,train-teacher,data3pct-hard-es,,))
$(eval $(call RUN,data3pct-soft,distill,data3pct-soft,--teacher $(call teacher_of,1),$(call teacher_dep,1)))
$(foreach d,data3pct-hard data3pct-hard-es,$(foreach s,$(EXTRA_SEEDS),$(eval $(call RUN,$(d)-s$(s),train-teacher,$(d),--seed $(s),))))
$(foreach s,$(EXTRA_SEEDS),$(eval $(call RUN,data3pct-soft-s$(s),distill,data3pct-soft,--seed $(s) --teacher $(call teacher_of,$(s)),$(call teacher_dep,$(s)))))

# Table 1 analogue: single net, 10-net ensemble, and the single net distilled from it with each transfer-set
# protocol (ensemble-distill: the images as they are; ensemble-distill-jitter: ±2 px shifts), on MNIST and
# Fashion-MNIST (run names and experiment files ensemble*[-fashion]); single and distilled nets for 3 seeds
ENSEMBLE_SEEDS := 1 2 3
ENSEMBLE_DATA  := - -fashion
seeded = $(1)$(if $(filter-out 1,$(2)),-s$(2))
$(foreach d,$(ENSEMBLE_DATA),$(eval $(call RUN,ensemble$(d:-=),train-ensemble,ensemble$(d:-=),,)))
$(foreach d,$(ENSEMBLE_DATA),$(foreach s,$(ENSEMBLE_SEEDS),$(eval $(call RUN,$(call seeded,ensemble-single$(d:-=),$(s)),train-teacher,ensemble-single$(d:-=),--seed $(s),))))
$(foreach d,$(ENSEMBLE_DATA),$(foreach p,ensemble-distill ensemble-distill-jitter,$(foreach s,$(ENSEMBLE_SEEDS),$(eval $(call RUN,$(call seeded,$(p)$(d:-=),$(s)),distill,$(p)$(d:-=),--seed $(s) --teacher $(RUNS)/ensemble$(d:-=),$(RUNS)/ensemble$(d:-=)/result.json)))))
ensembles: $(foreach d,$(ENSEMBLE_DATA),$(RUNS)/ensemble$(d:-=)/result.json \
	$(foreach p,ensemble-single ensemble-distill ensemble-distill-jitter,$(foreach s,$(ENSEMBLE_SEEDS),$(RUNS)/$(call seeded,$(p)$(d:-=),$(s))/result.json)))

# §5 analogue: a generalist per dataset, then specialists on the classes it confuses and their control, 3 seeds
# each; `make specialists-fashion` (Fashion-MNIST) or `make specialists-mnist`; `make specialists` adds the report.
SPECIALIST_SEEDS := 1 2 3
$(foreach d,fashion mnist,$(foreach s,$(SPECIALIST_SEEDS),$(eval $(call RUN,generalist-$(d)$(if $(filter-out 1,$(s)),-s$(s)),train-teacher,generalist-$(d),--seed $(s),))))
$(foreach d,fashion mnist,$(foreach s,$(SPECIALIST_SEEDS),$(eval $(call RUN,specialists-$(d)$(if $(filter-out 1,$(s)),-s$(s)),train-specialists,specialists-$(d),--seed $(s) --generalist $(RUNS)/generalist-$(d)$(if $(filter-out 1,$(s)),-s$(s)),$(RUNS)/generalist-$(d)$(if $(filter-out 1,$(s)),-s$(s))/result.json))))
# the control: generalist k trained further with the specialists' recipe, no clusters (seed k from generalist k)
$(foreach d,fashion mnist,$(foreach s,$(SPECIALIST_SEEDS),$(eval $(call RUN,specialists-control-$(d)$(if $(filter-out 1,$(s)),-s$(s)),train-teacher,specialists-control-$(d),--seed $(s) --set init_from=$(RUNS)/generalist-$(d)$(if $(filter-out 1,$(s)),-s$(s)),$(RUNS)/generalist-$(d)$(if $(filter-out 1,$(s)),-s$(s))/result.json))))
specialists-fashion: $(foreach s,$(SPECIALIST_SEEDS),$(foreach r,specialists-fashion specialists-control-fashion,$(RUNS)/$(r)$(if $(filter-out 1,$(s)),-s$(s))/result.json))
specialists-mnist: $(foreach s,$(SPECIALIST_SEEDS),$(foreach r,specialists-mnist specialists-control-mnist,$(RUNS)/$(r)$(if $(filter-out 1,$(s)),-s$(s))/result.json))
specialists: specialists-fashion specialists-mnist
	$(MAKE) --no-print-directory report

teacher: $(RUNS)/teacher/result.json $(EXTRA_SEEDS:%=$(RUNS)/teacher-s%/result.json)
# the released recipe's three seeds from nothing, then their test errors beside the released teachers'
teachers: $(RUNS)/teacher/result.json $(RUNS)/teacher-s2/result.json $(RUNS)/teacher-s3/result.json
	$(KDCLI) teachers --compare $(RUNS) --release $(RELEASE)
student: $(RUNS)/student/result.json $(EXTRA_SEEDS:%=$(RUNS)/student-s%/result.json)
distill: $(RUNS)/distill/result.json $(EXTRA_SEEDS:%=$(RUNS)/distill-s%/result.json)
data3pct: $(foreach d,data3pct-hard data3pct-hard-es data3pct-soft,$(RUNS)/$(d)/result.json $(EXTRA_SEEDS:%=$(RUNS)/$(d)-s%/result.json))
# the sweep keeps finished grid points and resumes interrupted ones by itself
# seed k of the sweep (runs tsweep-sK-<width>) distils from teacher k
tsweep: $(call teacher_dep,1) $(foreach s,$(EXTRA_SEEDS),$(call teacher_dep,$(s)))
	$(KDCLI) sweep -c $(EXP)/tsweep.yaml --out $(RUNS) --teacher $(call teacher_of,1) $(PRECISION_FLAG) $(SWEEP_ON_RAY)
	$(foreach s,$(EXTRA_SEEDS),$(KDCLI) sweep -c $(EXP)/tsweep.yaml --out $(RUNS) --seed $(s) --set name=tsweep-s$(s) --teacher $(call teacher_of,$(s)) $(PRECISION_FLAG) $(SWEEP_ON_RAY) && ) true
# CARRY=results/summary.json keeps an earlier report's ensemble and specialist rows that $(RUNS) has no runs
# for (marked †; they use no teacher), so the paper's rows can be rebuilt on new teachers alone
report:
	$(KDCLI) report --runs $(RUNS) --out $(RESULTS) $(REPORT_TEACHERS)$(if $(CARRY), --carry $(CARRY))

paper: $(if $(filter scratch,$(TEACHERS)),teacher) student distill data3pct tsweep omit3 only78
	$(MAKE) --no-print-directory report

install: $(BIN)/kdcli
$(BIN)/kdcli: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH) -e '.[test]'

test: install
	$(BIN)/pytest tests

# every command end to end on tiny experiments (about a minute on CPU), into $(RUNS)/smoke-*
smoke:
	$(KDCLI) train-teacher -c experiments/smoke/teacher.yaml --out $(RUNS)/smoke-teacher --force
	$(KDCLI) train-teacher -c experiments/smoke/student.yaml --out $(RUNS)/smoke-student --force
	$(KDCLI) distill -c experiments/smoke/distill.yaml --teacher $(RUNS)/smoke-teacher --out $(RUNS)/smoke-distill --force
	$(KDCLI) train-ensemble -c experiments/smoke/ensemble.yaml --out $(RUNS)/smoke-ensemble --force
	$(KDCLI) omit-class -c experiments/smoke/omit-3.yaml --teacher $(RUNS)/smoke-teacher --bias-shift 3=+3.5 --out $(RUNS)/smoke-omit-3 --force
	$(KDCLI) omit-class -c experiments/smoke/only-7-8.yaml --teacher $(RUNS)/smoke-teacher --out $(RUNS)/smoke-only-7-8 --force
	$(KDCLI) eval $(RUNS)/smoke-distill
	$(KDCLI) eval $(RUNS)/smoke-omit-3 --bias-shift 3=+3.5
	$(KDCLI) train-teacher -c experiments/smoke/generalist-fashion.yaml --out $(RUNS)/smoke-generalist-fashion --force
	$(KDCLI) train-specialists -c experiments/smoke/specialists-fashion.yaml --generalist $(RUNS)/smoke-generalist-fashion --out $(RUNS)/smoke-specialists-fashion --force
	$(KDCLI) eval $(RUNS)/smoke-specialists-fashion

bench:
	$(KDCLI) bench

# on a CUDA machine: the CUDA tests, `kdcli bench`, and a timed `make -j8 paper` (then SEEDS=3) into runs-gpu/,
# all inside GPU_SECONDS; logs and a tarball of the finished runs' results go to gpu-check/ (results/h200 was made so).
# It starts from empty runs-gpu/ and results-gpu/ (an earlier check's are removed; its tarball in gpu-check/ stays until the next check).
# With no KDCLI_DATA_DIR the data folder is passed as '' and kdcli's own lookup finds the files.
GPU_SECONDS ?= 3600
gpu-check:
	PYTHON=$(abspath $(BIN)/python) scripts/gpu-check.sh '$(KDCLI_DATA_DIR)' gpu-check $(GPU_SECONDS)

# Issue 4's comparison end to end, as a user runs it: one train-ensemble run of K = 10 nets against the
# ten single runs it stands for (member k's seed is 1 + 1000k), each a whole kdcli process with its own
# start-up, data loading and per-epoch evaluation. `kdcli bench --ensemble` times the training loop alone.
# It uses the Fashion-MNIST ensemble files, whose unregularised members are the recipe results/bench.txt timed.
BENCH_NET ?= 30,30
BENCH_EPOCHS ?= 5
bench-runs:
	@/usr/bin/time -f "K = 10 together (one train-ensemble run), $(BENCH_NET): %e s" sh -c \
	  '$(KDCLI) train-ensemble -c $(EXP)/ensemble-fashion.yaml --hidden $(BENCH_NET) --epochs $(BENCH_EPOCHS) \
	  --out $(RUNS)/bench-together --force > /dev/null 2>&1'
	@/usr/bin/time -f "K = 10 one after another (ten train-teacher runs), $(BENCH_NET): %e s" sh -c \
	  'for k in 0 1 2 3 4 5 6 7 8 9; do $(KDCLI) train-teacher -c $(EXP)/ensemble-single-fashion.yaml --hidden $(BENCH_NET) \
	  --epochs $(BENCH_EPOCHS) --seed $$((1 + 1000 * k)) --out $(RUNS)/bench-single-$$k --force > /dev/null 2>&1 || exit 1; done'

# what the targets leave outside results/: smoke and bench runs, GPU-check output, build files.
# The paper's runs (hours of CPU) go only when asked for by name: make clean-runs.
clean:
	rm -rf $(RUNS)/smoke-* $(RUNS)/bench-* gpu-check runs-gpu results-gpu build kdcli.egg-info .pytest_cache
clean-runs:
	rm -rf $(RUNS)

# §3, digits missing from the transfer set: `make omit3`, `make only78` (SEEDS as above: the
# students' seeds; seed k distils from teacher k, as the distilled row does).
# The paper's own shifts, chosen on the test set, go in as the user protocol beside the fitted ones;
# each run's result.json carries the "bias_correction" table and its bias.png goes to $(RESULTS).
$(foreach d,omit-3 omit-3-jitter,$(eval $(call RUN,$(d),omit-class,$(d),--teacher $(call teacher_of,1) --bias-shift 3=+3.5,$(call teacher_dep,1))))
$(eval $(call RUN,only-7-8,omit-class,only-7-8,--teacher $(call teacher_of,1) --bias-shift 7=-7.6 --bias-shift 8=-7.6,$(call teacher_dep,1)))
$(foreach d,omit-3 omit-3-jitter,$(foreach s,$(EXTRA_SEEDS),$(eval $(call RUN,$(d)-s$(s),omit-class,$(d),--seed $(s) --teacher $(call teacher_of,$(s)) --bias-shift 3=+3.5,$(call teacher_dep,$(s))))))
$(foreach s,$(EXTRA_SEEDS),$(eval $(call RUN,only-7-8-s$(s),omit-class,only-7-8,--seed $(s) --teacher $(call teacher_of,$(s)) --bias-shift 7=-7.6 --bias-shift 8=-7.6,$(call teacher_dep,$(s)))))
omit3: $(RUNS)/omit-3/result.json $(EXTRA_SEEDS:%=$(RUNS)/omit-3-s%/result.json) $(RESULTS)/omit-3-bias.png
only78: $(RUNS)/only-7-8/result.json $(EXTRA_SEEDS:%=$(RUNS)/only-7-8-s%/result.json) $(RESULTS)/only-7-8-bias.png
$(RESULTS)/%-bias.png: $(RUNS)/%/result.json
	@mkdir -p $(RESULTS)
	cp $(RUNS)/$*/bias.png $@

# Beyond the paper: the distilled, omit-3 and 3% rows again with a jittered (±2 px) transfer set, the teacher
# run on each shifted batch (the paper's transfer set had no jitter). `make jitter` (SEEDS as above); not part
# of `make paper`, whose hour it would overrun.
# (the distill-jitter and omit-3-jitter runs are defined with distill and omit-3, above)
$(eval $(call RUN,data3pct-hard-jitter,train-teacher,data3pct-hard-jitter,,))
$(eval $(call RUN,data3pct-soft-jitter,distill,data3pct-soft-jitter,--teacher $(call teacher_of,1),$(call teacher_dep,1)))
jitter: $(RUNS)/distill-jitter/result.json $(EXTRA_SEEDS:%=$(RUNS)/distill-jitter-s%/result.json) \
	$(RUNS)/omit-3-jitter/result.json $(EXTRA_SEEDS:%=$(RUNS)/omit-3-jitter-s%/result.json) $(RESULTS)/omit-3-jitter-bias.png \
	$(RUNS)/data3pct-hard-jitter/result.json $(RUNS)/data3pct-soft-jitter/result.json
	$(MAKE) --no-print-directory report
