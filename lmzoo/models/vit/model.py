"""ViT (Dosovitskiy et al. 2021) = a pre-LayerNorm bidirectional encoder over image patches: the
image is cut into p×p patches, each projected to a token (``PatchEmbedding``: a stride-p
convolution), a learned [CLS] token goes in front, learned positions are added, and the final
[CLS] state is the image's representation (eq. 4: y = LN(z_L^0)).

diff from BERT: patches instead of word pieces (no vocabulary, no segments); pre-norm with a final
LayerNorm instead of post-norm; positions are a 2D grid, interpolated for other image sizes. The
classifier reads the normed [CLS] state directly; the tanh pooler (``ViTModel``'s ``pooler_output``)
is a separate head, as in BERT, and ``ViTForImageClassification`` has none.
diff from CLIP's image tower (lmzoo/models/clip): no LayerNorm before the encoder, and the final norm
is applied to every token, not to the pooled [CLS] only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

from lmzoo.models.vit.config import ViTConfig
from lmzoo.nn.attention import Attention
from lmzoo.nn.mlp import MLP, activation
from lmzoo.nn.norms import LayerNorm
from lmzoo.nn.patches import PatchEmbedding
from lmzoo.nn.transformer import Encoder, TransformerLayer, describe_layer


@dataclass
class ViTOutput:
    last_hidden_state: torch.Tensor  # (B, 1 + N, D), after the final LayerNorm
    pooler_output: torch.Tensor | None = None  # (B, pooler_dim): act(W·h[CLS] + b)
    logits: torch.Tensor | None = None  # (B, num_labels): classifier over h[CLS]
    loss: torch.Tensor | None = None


class ViT(nn.Module):
    """patches + [CLS] + positions -> pre-norm Encoder -> final LN -> [pooler] [classifier]."""

    def __init__(self, config: ViTConfig, *, patches: PatchEmbedding, encoder: Encoder):
        super().__init__()
        self.config = config
        self.patches, self.encoder = patches, encoder
        self.pooler = nn.Linear(config.d_model, config.pooler_dim) if config.pooler else None
        self.pooler_act = activation(config.pooler_act)
        self.classifier = nn.Linear(config.d_model, config.num_labels) if config.num_labels else None

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> ViTOutput:
        """``pixel_values`` (B, C, H, W), normalised; any H, W of at least one patch (the positions are
        interpolated when the grid differs from the trained one). ``labels`` (B,) class ids give ``.loss``."""
        h = self.encoder(self.patches(pixel_values))  # (B, 1 + N, D)
        out = ViTOutput(last_hidden_state=h)
        if self.pooler is not None:
            out.pooler_output = self.pooler_act(self.pooler(h[:, 0]))
        if self.classifier is not None:
            out.logits = self.classifier(h[:, 0])  # (B, num_labels)
        if labels is not None:
            if out.logits is None:
                raise ValueError("labels need the classifier; this ViT has none (num_labels = 0)")
            if labels.is_floating_point() or self.config.num_labels < 2:
                # transformers would switch to MSE (num_labels = 1) or a multi-label BCE (float labels)
                raise ValueError("the ViT loss is single-label cross-entropy: integer class ids and at least "
                                 f"2 labels (got {labels.dtype} labels, num_labels = {self.config.num_labels})")
            out.loss = F.cross_entropy(out.logits.float(), labels.to(out.logits.device).reshape(-1))
        return out

    # -- introspection used by the zoo table -------------------------------------------------
    def describe(self) -> dict:
        p = self.patches
        heads = [n for n, m in (("pooler", self.pooler), (f"classifier ({self.config.num_labels})", self.classifier))
                 if m is not None]
        return {**describe_layer(self.encoder.layers[0]), "layers": len(self.encoder.layers),
                "position": f"learned 2D, {p.grid}x{p.grid} patches of {p.patch_size}px + [CLS], interpolated",
                "heads": "+".join(heads) or "none"}

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 0  # an encoder keeps no cache

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def encoder_layers(d: int, n_layers: int, n_heads: int, d_ff: int, act: str, eps: float, kernel: str,
                   qkv_bias: bool = True, attn_dropout: float = 0.0, dropout: float = 0.0) -> list[TransformerLayer]:
    """Pre-LN layers with biases everywhere and a plain MLP: ViT's, and both of CLIP's towers'.
    ``attn_dropout`` on the attention probabilities, ``dropout`` on each sublayer's output (ViT's)."""
    return [TransformerLayer(attn=Attention(d, n_heads, qkv_bias=qkv_bias, out_bias=True, kernel=kernel,
                                            dropout=attn_dropout),
                             mlp=MLP(d, d_ff, act=act, bias=True),
                             attn_norm=LayerNorm(d, eps=eps), mlp_norm=LayerNorm(d, eps=eps), placement="pre",
                             dropout=dropout)
            for _ in range(n_layers)]


def build(cfg: ViTConfig) -> ViT:
    d = cfg.d_model
    layers = encoder_layers(d, cfg.n_layers, cfg.n_heads, cfg.d_ff, cfg.act, cfg.norm_eps, cfg.attn_kernel,
                            cfg.qkv_bias, attn_dropout=cfg.attention_dropout, dropout=cfg.hidden_dropout)
    return ViT(cfg, patches=PatchEmbedding(d, cfg.image_size, cfg.patch_size, cfg.num_channels, bias=True),
               encoder=Encoder(layers, final_norm=LayerNorm(d, eps=cfg.norm_eps), input_dropout=cfg.hidden_dropout))
