"""Training under Hugging Face Accelerate, shared by the teacher and distill stages.

* :mod:`.processes` -- this process's place in the run and its Accelerator;
* :mod:`.loaders` -- seeded, sharded, restartable batches and their augmentation;
* :mod:`.step` -- one (micro-)step of a method's networks, and the test evaluation;
* :mod:`.checkpoint` -- atomic, verified checkpoints and the resume decision;
* :mod:`.guards` -- non-finite losses, replica drift, BatchNorm statistics over processes;
* :mod:`.loop` -- :func:`train`: resume, run epochs, end each with metrics and a checkpoint.

Import from the submodules: importing this package loads nothing (Accelerate is slow to import).
"""
