"""BERT4Rec: a bidirectional transformer over item tokens, scored against its own item table.

Input at each position: item embedding + the previous position's item through an input-only
table (``previous_item_input``) + learned position embedding (right-aligned: the trailing
[MASK] always has index ``max_len - 1``) + context embeddings (time of day, device, segment,
event type; token 0 = unknown adds nothing). Then PyTorch's own ``nn.TransformerEncoderLayer``
stack (bidirectional, pre-LN), and the [MASK] position is scored against the item embedding
table itself (tied) plus a per-item bias.

No Dagster import, so ``torchrun`` and the ONNX exporter use it directly; the forward path has
no data-dependent Python control flow (``score_next`` exports with dynamic batch and length).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn import functional as F

from recsys_serving.contract import FIRST_ITEM_TOKEN, MASK_TOKEN, PAD_TOKEN, TIME_OF_DAY_BUCKETS

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
EXTRA_FILE = "extra.json"
FORMAT_VERSION = 1


class BERT4RecConfig(BaseModel):
    """Every size of the network. Context vocab sizes count token 0 (= unknown, a no-op)."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(ge=FIRST_ITEM_TOKEN + 1, description="item tokens incl. PAD=0 and MASK=1")
    hidden: int = Field(256, ge=8)
    layers: int = Field(4, ge=1)
    heads: int = Field(8, ge=1)
    max_len: int = Field(50, ge=2, description="longest input incl. the trailing [MASK]")
    ffn_mult: int = Field(4, ge=1, description="feed-forward width = ffn_mult * hidden")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="embedding, residual and feed-forward dropout")
    attn_dropout: float | None = Field(None, ge=0.0, lt=1.0, description="attention dropout; None = dropout")
    norm_first: bool = Field(True, description="pre-LN blocks (stable without long warm-up)")
    activation: Literal["gelu", "relu"] = "gelu"
    output_head: bool = Field(
        False,
        description="BERT's dense+GELU+LayerNorm transform before the tied output; off by default: on "
        "Amazon Beauty it lowered NDCG@10 (it squeezes the scores' scale through a LayerNorm)",
    )
    previous_item_input: bool = Field(
        True,
        description="each position also gets an input-only embedding of the token before it: a direct "
        "path from the latest item to the trailing [MASK], which attention alone learns slowly",
    )
    previous_item_init: Literal["zeros", "item"] = Field(
        "zeros", description="start the previous-item table at zero or as a copy of the item table"
    )
    final_norm: bool = Field(True, description="pre-LN only: LayerNorm after the last block")
    input_item_table: bool = Field(
        False,
        description="add a second item table on the input side only (the output stays tied to the first): "
        "per-item room to encode what tends to follow an item without bending its output embedding",
    )
    n_tod: int = Field(TIME_OF_DAY_BUCKETS + 1, ge=1)
    n_event_types: int = Field(4, ge=1)
    n_devices: int = Field(1, ge=1)
    n_segments: int = Field(1, ge=1)
    layer_norm_eps: float = 1e-6
    init_std: float = Field(0.02, gt=0.0)

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> "BERT4RecConfig":
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        return self

    @property
    def n_items(self) -> int:
        return self.vocab_size - FIRST_ITEM_TOKEN


class FastDropout(nn.Dropout):
    """Inverted dropout whose CPU mask comes from numpy's PCG64 generator.

    Written by hand because PyTorch's CPU ``bernoulli_`` draws one Mersenne-Twister number per
    element, a large share of a CPU training step. The seed of each mask is drawn from
    torch's global generator, so runs stay reproducible and a restored RNG state replays the
    same masks. The drop probability is rounded to a multiple of 1/65536. CUDA uses F.dropout.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return super().forward(x)
        seed = int(torch.randint(0, 2**62, (1,)).item())
        raw = np.random.default_rng(seed).bytes(2 * x.numel())
        bits = torch.frombuffer(bytearray(raw), dtype=torch.int16).view(x.shape)
        keep = bits >= (-32768 + int(round(self.p * 65536)))
        return x * keep * (1.0 / (1.0 - self.p))


class BERT4Rec(nn.Module):
    """item + right-aligned position + context embeddings -> encoder -> tied output with bias.

    Inputs are left-padded, so the most recent token always sits at position index
    ``max_len - 1`` whatever the batch's padded length: training with dynamic padding and
    inference then agree on what "last" means.
    """

    def __init__(self, config: BERT4RecConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden
        self.item_emb = nn.Embedding(config.vocab_size, h, padding_idx=PAD_TOKEN)
        self.item_in_emb = nn.Embedding(config.vocab_size, h, padding_idx=PAD_TOKEN) if config.input_item_table else None
        self.prev_item_emb = (
            nn.Embedding(config.vocab_size, h, padding_idx=PAD_TOKEN) if config.previous_item_input else None
        )
        self.pos_emb = nn.Embedding(config.max_len, h)
        # padding_idx=0 keeps the "unknown" row at zero with no gradient: absent context adds nothing.
        self.tod_emb = nn.Embedding(config.n_tod, h, padding_idx=0)
        self.event_emb = nn.Embedding(config.n_event_types, h, padding_idx=0)
        self.device_emb = nn.Embedding(config.n_devices, h, padding_idx=0)
        self.segment_emb = nn.Embedding(config.n_segments, h, padding_idx=0)
        self.emb_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.emb_dropout = FastDropout(config.dropout)
        layer = nn.TransformerEncoderLayer(
            d_model=h,
            nhead=config.heads,
            dim_feedforward=config.ffn_mult * h,
            dropout=config.dropout,
            activation=config.activation,
            layer_norm_eps=config.layer_norm_eps,
            batch_first=True,
            norm_first=config.norm_first,
        )
        # nested tensors turn padding into data-dependent shapes, which ONNX export cannot trace
        self.encoder = nn.TransformerEncoder(
            layer,
            num_layers=config.layers,
            norm=nn.LayerNorm(h, eps=config.layer_norm_eps) if config.norm_first and config.final_norm else None,
            enable_nested_tensor=False,
        )
        for block in self.encoder.layers:
            block.dropout, block.dropout1, block.dropout2 = (FastDropout(config.dropout) for _ in range(3))
            if config.attn_dropout is not None:
                block.self_attn.dropout = config.attn_dropout
        if config.output_head:
            self.head: nn.Module = nn.Sequential(
                nn.Linear(h, h), nn.GELU(), nn.LayerNorm(h, eps=config.layer_norm_eps)
            )
        else:
            self.head = nn.Identity()
        self.out_bias = nn.Parameter(torch.zeros(config.vocab_size))
        # PAD and MASK are never an answer: a constant additive mask keeps export graph static.
        special = torch.zeros(config.vocab_size)
        special[[PAD_TOKEN, MASK_TOKEN]] = float("-inf")
        self.register_buffer("special_mask", special, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
                if module.padding_idx is not None:
                    with torch.no_grad():
                        module.weight[module.padding_idx].zero_()
        # MultiheadAttention keeps its input projection as a raw parameter, not an nn.Linear
        for block in self.encoder.layers:
            nn.init.trunc_normal_(block.self_attn.in_proj_weight, std=std, a=-2 * std, b=2 * std)
        nn.init.zeros_(self.out_bias)
        for extra in (self.item_in_emb, self.prev_item_emb):
            if extra is not None:
                nn.init.zeros_(extra.weight)  # starts as the plain tied model
        if self.prev_item_emb is not None and self.config.previous_item_init == "item":
            with torch.no_grad():
                self.prev_item_emb.weight.copy_(self.item_emb.weight)

    def forward(
        self,
        tokens: Tensor,
        tod: Tensor | None = None,
        devices: Tensor | None = None,
        segments: Tensor | None = None,
        event_types: Tensor | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """tokens [B, L] (left-padded, L <= max_len) -> hidden states [B, L, H], or [B, 1, H] of the
        last position only with ``last_only`` (same values, the last block computed for one query)."""
        length = tokens.shape[1]
        x = self.item_emb(tokens) + self.pos_emb.weight[self.config.max_len - length :].unsqueeze(0)
        if self.item_in_emb is not None:
            x = x + self.item_in_emb(tokens)
        if self.prev_item_emb is not None:
            # the token one position to the left (PAD before the first): a static shift, export-safe
            x = x + self.prev_item_emb(F.pad(tokens[:, :-1], (1, 0), value=PAD_TOKEN))
        # a context the model was trained without (table of one "unknown" row) is ignored, so
        # callers may always pass the request context; these checks read the config, not data
        cfg = self.config
        if tod is not None and cfg.n_tod > 1:
            x = x + self.tod_emb(tod.long())
        if devices is not None and cfg.n_devices > 1:
            x = x + self.device_emb(devices.long())
        if segments is not None and cfg.n_segments > 1:
            x = x + self.segment_emb(segments.long())
        if event_types is not None and cfg.n_event_types > 1:
            x = x + self.event_emb(event_types.long())
        x = self.emb_dropout(self.emb_norm(x))
        padding = tokens == PAD_TOKEN
        if not last_only:
            return self.encoder(x, src_key_padding_mask=padding)
        # Only the trailing [MASK] is scored at inference and in next-item training, and in the last
        # block no other position feeds it: its attention query, residual and feed-forward are needed
        # for that one position (the keys and values still come from all of them).
        blocks = self.encoder.layers
        for block in blocks[:-1]:
            x = block(x, src_key_padding_mask=padding)
        x = _last_query_block(blocks[-1], x, padding)
        return self.encoder.norm(x) if self.encoder.norm is not None else x

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden [..., H] -> scores over the whole vocabulary [..., V] (PAD, MASK = -inf)."""
        return self.head(hidden) @ self.item_emb.weight.t() + self.out_bias + self.special_mask

    def score_next(
        self,
        tokens: Tensor,
        tod: Tensor | None = None,
        devices: Tensor | None = None,
        segments: Tensor | None = None,
        event_types: Tensor | None = None,
    ) -> Tensor:
        """Scores [B, V] for the next item; the last input position must be [MASK]."""
        hidden = self.forward(
            tokens, tod=tod, devices=devices, segments=segments, event_types=event_types, last_only=True
        )
        return self.logits(hidden[:, -1])


def _last_query_block(block: nn.TransformerEncoderLayer, x: Tensor, padding: Tensor) -> Tensor:
    """``block(x)[:, -1:]`` computed for the last query only, with the block's own modules and the
    same order of operations as ``nn.TransformerEncoderLayer`` (pre- or post-LN)."""
    def attend(inputs: Tensor) -> Tensor:
        out = block.self_attn(inputs[:, -1:], inputs, inputs, key_padding_mask=padding, need_weights=False)[0]
        return block.dropout1(out)

    last = x[:, -1:]
    if block.norm_first:
        y = last + attend(block.norm1(x))
        return y + block._ff_block(block.norm2(y))
    y = block.norm1(last + attend(x))
    return block.norm2(y + block._ff_block(y))


def token_tables(model: BERT4Rec) -> dict[str, Tensor]:
    """Tensors with one row per token (item tables and the output bias), by state-dict name."""
    vocab = model.config.vocab_size
    return {name: t for name, t in model.state_dict().items() if t.ndim >= 1 and t.shape[0] == vocab}


def save_model(
    directory: str | Path, model: BERT4Rec, config: BERT4RecConfig, extra: dict[str, Any] | None = None
) -> None:
    """Writes ``model.safetensors`` + ``config.json`` (+ ``extra.json``); never pickle."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "format_version": str(FORMAT_VERSION)})
    tmp.replace(directory / WEIGHTS_FILE)
    _write_json(directory / CONFIG_FILE, {"format_version": FORMAT_VERSION, "model": config.model_dump()})
    if extra is not None:
        _write_json(directory / EXTRA_FILE, extra)


def load_model(directory: str | Path, map_location: str = "cpu") -> tuple[BERT4Rec, BERT4RecConfig]:
    """Reads what :func:`save_model` wrote; the model is returned in eval mode."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: {directory} is not a saved BERT4Rec model")
    raw = json.loads(config_path.read_text())
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{config_path}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    config = BERT4RecConfig.model_validate(raw["model"])
    model = BERT4Rec(config)
    model.load_state_dict(load_file(str(weights_path), device=map_location))
    model.eval()
    return model, config


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default))
    tmp.replace(path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
