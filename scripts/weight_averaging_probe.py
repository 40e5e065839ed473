"""A research probe, not a kdcli feature: does averaging a distilled student's weights along its
trajectory (EMA, or SWA's uniform average) help it on images it was not distilled on?

It runs kdcli's own training loop (run_training) on experiments/search/vt-e60-teacher-e200.yaml and
keeps three averaged copies of the student beside it, updated after every step: EMA 0.999, EMA 0.9998,
and the uniform average of every step from epoch 31 on. Every evaluation adds their validation and test
errors to metrics.jsonl (keys val_errors_ema999, ..._ema9998, ..._swa31); the run directory is otherwise
a normal kdcli run of the final weights. Results: results/NOTES.md, "Weight averaging".

usage: KDCLI_DATA_DIR=... OMP_NUM_THREADS=1 .venv/bin/python scripts/weight_averaging_probe.py TEACHER OUT ['{"yaml_key": value}']
"""

import json
import math
import sys
from pathlib import Path

from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from kdcli.config import load_config
from kdcli.evaluate import count_errors, predict
from kdcli.train import Hooks, run_training, standard_recipe

CONFIG = "experiments/search/vt-e60-teacher-e200.yaml"
SWA_FROM_EPOCH = 31


def averaging_recipe(hooks: Hooks):
    """standard_recipe, plus averaged copies of the model updated in hooks.on_step and evaluated with it."""

    def recipe(cfg, data, device, command):
        plan = standard_recipe(cfg, data, device, command)
        model, evaluate_final = plan.model, plan.evaluate
        averaged = {
            "ema999": AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999)),
            "ema9998": AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9998)),
            "swa31": AveragedModel(model),  # the default: a uniform average of every update
        }
        swa_from_step = (SWA_FROM_EPOCH - 1) * math.ceil(len(plan.transfer.images) / cfg.batch_size)
        steps = [0]

        def on_step():
            steps[0] += 1
            averaged["ema999"].update_parameters(model)
            averaged["ema9998"].update_parameters(model)
            if steps[0] > swa_from_step:
                averaged["swa31"].update_parameters(model)

        def evaluate(current):
            record = evaluate_final(current)
            for name, copy in averaged.items():
                if copy.n_averaged.item() == 0:
                    continue
                for split, images, labels in (("val", data.val_x, data.val_y), ("test", data.test_x, data.test_y)):
                    record[f"{split}_errors_{name}"] = count_errors(predict(copy.module, images), labels).tolist()
            return record

        hooks.on_step = on_step
        plan.evaluate = evaluate
        return plan

    return recipe


def main(teacher: str, out: str, overrides: str = "{}") -> None:
    cfg = load_config(CONFIG, {"teacher": teacher, "out": out, "name": Path(out).name, **json.loads(overrides)})
    hooks = Hooks()
    result = run_training(cfg, "distill", hooks=hooks, recipe=averaging_recipe(hooks))
    print(json.dumps({"val_errors": result["val_errors"], "test_errors": result["test"]["n_errors"]}))


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit("usage: scripts/weight_averaging_probe.py TEACHER OUT ['{\"yaml_key\": value}']")
    main(*sys.argv[1:])
