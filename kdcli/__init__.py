"""kdcli: knowledge-distillation experiments from the command line.

Reproduces the MNIST results of Hinton, Vinyals & Dean (2015), "Distilling the
Knowledge in a Neural Network". See README.md, or run `kdcli --help`.
"""

import torch

__version__ = "0.1.0"

# Flush denormal floats to zero, here rather than in the training loop: the flag is per thread, and
# torch's OpenMP worker threads copy it from the thread that starts them, at torch's first parallel
# operation (loading the data). Set later, it reached only the main thread, so with two threads half
# of each denormal-heavy op (Adam's decaying moments) ran at denormal speed and a teacher's epochs
# grew from 7 to 16 s. Flushing changes no update by more than ~1e-30.
torch.set_flush_denormal(True)
