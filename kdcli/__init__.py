"""kdcli: knowledge-distillation experiments from the command line.

Reproduces the MNIST results of Hinton, Vinyals & Dean (2015), "Distilling the
Knowledge in a Neural Network". See README.md, or run `kdcli --help`.
"""

__version__ = "0.1.0"
