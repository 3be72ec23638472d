"""Stages of a model's life (pretrain; later SFT, reward modelling, DPO, PPO): each wires data, a
model, an objective and the shared training loop (``lmzoo.train``), and nothing more."""
