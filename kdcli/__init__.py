"""kdcli: knowledge-distillation experiments from the command line.

Reproduces the MNIST results of Hinton, Vinyals & Dean (2015), "Distilling the
Knowledge in a Neural Network". See README.md, or run `kdcli --help`.
"""

import torch

__version__ = "0.1.0"

# Flush denormal floats to zero. Adam's moments for weights that get no gradient (border pixels, dead
# units) decay into the denormal range, where CPU arithmetic is several times slower; flushing changes
# no update by more than ~1e-30. Set here, not in the training loop: the flag is per thread, and torch's
# OpenMP workers copy it from their creator when torch's first parallel op (loading the data) starts
# them. Set later, it reached only the main thread, and a two-thread teacher's epochs grew from 7 to 16 s.
torch.set_flush_denormal(True)
