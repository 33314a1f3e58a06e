"""Pretraining building blocks: data, tokenizer, optimizers, LR schedule, checkpoints and metrics.

Each module is standalone; the training loop (glm5.train.pretrain) joins them with the model, over the
stage chain and presets of glm5.train.stages (PretrainConfig, pretrain_preset), with data and expert
parallelism from glm5.train.parallel. Command line: `glm5 pretrain --preset debug --out DIR`.
Heavy optional dependencies (datasets, pyarrow, tensorboard, matplotlib) are imported only when used.
"""
