"""Pretraining building blocks: data, tokenizer, optimizers, LR schedule, checkpoints and metrics.

Each module is standalone; the training loop (glm5.train.pretrain) joins them with the model.
Heavy optional dependencies (datasets, pyarrow, tensorboard, matplotlib) are imported only when used.
"""
