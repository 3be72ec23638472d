"""CLIP (Radford et al. 2021) = two encoders and a shared embedding space, trained contrastively.

- Image tower: a ViT (``PatchEmbedding`` + pre-LN ``Encoder``) with two LayerNorms of its own: one on
  the embedded patches before the first layer ("pre_layrnorm"), and one on the pooled [CLS] state only
  ("post_layernorm"). diff from ViT: no final norm over the whole sequence, no bias on the patch
  projection, quick-GeLU, and no tanh pooler.
- Text tower: a GPT-2-shaped causal transformer (learned positions, pre-LN, final LN) used as an
  encoder: no cache, no LM head; the text is read at its EOS token (``eos_positions``).
- Both pooled states are projected linearly (no bias) to ``projection_dim`` and L2-normalised; the
  logits are their cosine similarities times exp(logit_scale), a learned inverse temperature. The
  loss is the symmetric InfoNCE of lmzoo/objectives/contrastive.py (paper, figure 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

from lmzoo.models.clip.config import CLIPConfig
from lmzoo.models.vit.model import encoder_layers
from lmzoo.nn.norms import LayerNorm
from lmzoo.nn.patches import PatchEmbedding
from lmzoo.nn.position import LearnedPositions
from lmzoo.nn.transformer import Encoder, describe_layer
from lmzoo.objectives.contrastive import clip_logits, symmetric_infonce


@dataclass
class CLIPOutput:
    logits_per_image: torch.Tensor  # (B_img, B_txt): exp(logit_scale) · cos(image_i, text_j)
    logits_per_text: torch.Tensor  # (B_txt, B_img), the transpose
    text_embeds: torch.Tensor  # (B_txt, P), projected and L2-normalised
    image_embeds: torch.Tensor  # (B_img, P), projected and L2-normalised
    loss: torch.Tensor | None = None  # symmetric InfoNCE; only with return_loss=True


def eos_positions(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(B,) index of the token each text is read at, by transformers' rule: with ``eos_token_id == 2``
    (configs written before transformers PR #24773, OpenAI's releases among them) the position of the
    row's highest id, since CLIP's end-of-text token is the last of its vocabulary; otherwise the first
    position holding ``eos_token_id`` (0 for a row without one). Pads may equal EOS: the first one counts."""
    if eos_token_id == 2:
        return input_ids.to(torch.int).argmax(dim=-1)
    return (input_ids == eos_token_id).to(torch.int).argmax(dim=-1)


class TextTower(nn.Module):
    """tokens + learned positions -> causal pre-LN Encoder -> final LN -> the state at EOS, (B, D)."""

    def __init__(self, embed: nn.Embedding, positions: LearnedPositions, encoder: Encoder, eos_token_id: int):
        super().__init__()
        self.embed, self.positions, self.encoder = embed, positions, encoder
        self.eos_token_id = eos_token_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(last_hidden_state (B, T, D), pooled (B, D)). Right padding, as CLIP's tokenizer pads."""
        B, T = input_ids.shape
        pos = torch.arange(T, device=input_ids.device)[None].expand(B, T)
        h = self.encoder(self.embed(input_ids) + self.positions(pos), attention_mask)  # (B, T, D), final LN applied
        return h, h[torch.arange(B, device=h.device), eos_positions(input_ids, self.eos_token_id).to(h.device)]


class VisionTower(nn.Module):
    """patches + [CLS] + positions -> pre_norm -> pre-LN Encoder -> post_norm([CLS]), (B, D)."""

    def __init__(self, patches: PatchEmbedding, pre_norm: nn.Module, encoder: Encoder, post_norm: nn.Module):
        super().__init__()
        self.patches, self.pre_norm, self.encoder, self.post_norm = patches, pre_norm, encoder, post_norm

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(last_hidden_state (B, 1 + N, D) without a final norm, pooled (B, D))."""
        h = self.encoder(self.pre_norm(self.patches(pixel_values)))  # (B, 1 + N, D)
        return h, self.post_norm(h[:, 0])


class CLIP(nn.Module):
    def __init__(self, config: CLIPConfig, *, text: TextTower, vision: VisionTower):
        super().__init__()
        self.config = config
        self.text, self.vision = text, vision
        P = config.projection_dim
        self.text_projection = nn.Linear(config.text.d_model, P, bias=False)
        self.visual_projection = nn.Linear(config.vision.d_model, P, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, P) projected text embeddings, not normalised (transformers' ``get_text_features``)."""
        return self.text_projection(self.text(input_ids, attention_mask)[1])

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, P) projected image embeddings, not normalised. Other image sizes interpolate the positions."""
        return self.visual_projection(self.vision(pixel_values)[1])

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None,
                return_loss: bool = False) -> CLIPOutput:
        """Texts (B_txt, T) and images (B_img, C, H, W); ``return_loss`` needs B_txt == B_img, the i-th text
        describing the i-th image."""
        text = F.normalize(self.get_text_features(input_ids, attention_mask), dim=-1)  # (B_txt, P)
        image = F.normalize(self.get_image_features(pixel_values), dim=-1)  # (B_img, P)
        logits_per_text = clip_logits(text, image, self.logit_scale)  # (B_txt, B_img)
        out = CLIPOutput(logits_per_image=logits_per_text.t(), logits_per_text=logits_per_text,
                         text_embeds=text, image_embeds=image)
        if return_loss:
            if text.shape[0] != image.shape[0]:
                raise ValueError(f"return_loss pairs text i with image i: got {text.shape[0]} texts and "
                                 f"{image.shape[0]} images")
            out.loss = symmetric_infonce(logits_per_text)
        return out

    # -- introspection used by the zoo table -------------------------------------------------
    def describe(self) -> dict:
        t, v = describe_layer(self.text.encoder.layers[0]), describe_layer(self.vision.encoder.layers[0])
        p = self.vision.patches
        return {"position": f"learned (text); learned 2D, {p.grid}x{p.grid} patches of {p.patch_size}px + [CLS] (image)",
                "activation": t["activation"], "norm": t["norm"] + " + pre-LN on patches",
                "attention": f"{t['attention']} (text), {v['attention']} (image)",
                "layers": f"{len(self.text.encoder.layers)}+{len(self.vision.encoder.layers)}"}

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 0  # two encoders, no cache

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build(cfg: CLIPConfig) -> CLIP:
    t, v, k = cfg.text, cfg.vision, cfg.attn_kernel
    text = TextTower(nn.Embedding(t.vocab_size, t.d_model), LearnedPositions(t.max_positions, t.d_model),
                     Encoder(encoder_layers(t.d_model, t.n_layers, t.n_heads, t.d_ff, t.act, t.norm_eps, k,
                                            attn_dropout=t.attention_dropout),
                             final_norm=LayerNorm(t.d_model, eps=t.norm_eps), causal=True),
                     eos_token_id=t.eos_token_id)
    vision = VisionTower(PatchEmbedding(v.d_model, v.image_size, v.patch_size, v.num_channels, bias=False),
                         pre_norm=LayerNorm(v.d_model, eps=v.norm_eps),
                         encoder=Encoder(encoder_layers(v.d_model, v.n_layers, v.n_heads, v.d_ff, v.act, v.norm_eps, k,
                                                        attn_dropout=v.attention_dropout)),
                         post_norm=LayerNorm(v.d_model, eps=v.norm_eps))
    return CLIP(cfg, text=text, vision=vision)
