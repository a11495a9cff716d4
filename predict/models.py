"""Predictors: the seed's MLP and an I-JEPA-style masked per-token transformer.

Both take a batch of RAW teacher states (see :mod:`codejepa.predict.data`), normalise on the
device with train-split statistics held as buffers (so they travel in the state dict), and
return ``pooled``: the predicted mean body state in the normalised pooled space
(``(x - pool_mu) / pool_sd``, or ZCA-whitened ``(x - pool_mu) @ pool_W`` with
``norm.pooled_space = "whitened"``, or the raw space itself with ``"raw"``, as the seed). :meth:`raw` maps it back to the teacher's raw space.

The transformer's output also has ``slots``: predictions for the K body slots (the body's
tokens pooled to a fixed K chunks, per-dimension standardised with body-token statistics).
Its pooled prediction is the mean of the slots mapped back through those statistics.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from codejepa.predict.config import ModelConfig, PredictConfig
from codejepa.predict.data import SEG_PAD
from codejepa.predict.normalize import NormStats

_ACT = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}
SEG_BODY_MASKED, SEG_BODY_REVEALED = 3, 4  # after data.py's pad, context and signature
N_SEGMENTS = 5


class Normaliser(nn.Module):
    """Train-split statistics as buffers (saved with the weights, never trained)."""

    NAMES = NormStats.ARRAYS

    def __init__(self, d: int, pooled_space: str = "standardized", score_space: str = "pooled") -> None:
        super().__init__()
        self.space = pooled_space
        for name in self.NAMES:
            init = torch.eye(d) if name.startswith("pool_W") else torch.ones(d) if name.endswith("sd") else torch.zeros(d)
            self.register_buffer(name, init)
        # The space InfoNCE and validation retrieval score in (``loss.space``): the pooled space
        # itself, or a linear map of it fitted on train (codejepa.predict.canonical). A buffer
        # only when used, so that older checkpoints load unchanged.
        if score_space == "canonical":
            self.register_buffer("score_map", torch.eye(d))
        else:
            self.score_map: torch.Tensor | None = None
        # Token-norm thresholds of the outlier filter, so that a checkpoint is self-contained.
        self.register_buffer("in_outlier_norm", torch.tensor(float("inf")))
        self.register_buffer("body_outlier_norm", torch.tensor(float("inf")))

    def load(self, stats: NormStats) -> None:
        for name in self.NAMES:
            getattr(self, name).copy_(torch.as_tensor(getattr(stats, name)))
        self.in_outlier_norm.fill_(stats.in_outlier_norm)
        self.body_outlier_norm.fill_(stats.body_outlier_norm)

    def stats(self) -> NormStats:
        return NormStats(**{k: getattr(self, k).detach().cpu().numpy().copy() for k in self.NAMES},
                         in_outlier_norm=float(self.in_outlier_norm), body_outlier_norm=float(self.body_outlier_norm))

    def pooled_to_raw(self, p: torch.Tensor) -> torch.Tensor:
        if self.space == "raw":
            return p
        if self.space == "whitened":
            return p @ self.pool_Winv + self.pool_mu
        return p * self.pool_sd + self.pool_mu

    def body_to_norm(self, body: torch.Tensor) -> torch.Tensor:
        if self.space == "raw":
            return body
        if self.space == "whitened":
            return (body - self.pool_mu) @ self.pool_W
        return (body - self.pool_mu) / self.pool_sd

    def slots_to_norm(self, slots: torch.Tensor) -> torch.Tensor:
        return (slots.float() - self.tok_mu) / self.tok_sd

    def to_score(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled-space vectors (predictions or bodies alike) in the scoring space."""
        return pooled if self.score_map is None else pooled @ self.score_map


def _pooled_views(m: nn.Module, d: int, cfg: ModelConfig) -> int:
    """Give ``m`` the pooled-view input (per-view train statistics as buffers) and, with
    ``cfg.linear_skip``, the linear path on it, zero until :mod:`codejepa.predict.ridge` fits it.
    Returns the width of the pooled views."""
    m.views = tuple(cfg.input_views)
    d_in = d * len(m.views)
    if m.views != ("mean",):  # per-view train statistics (see ridge.init_input_stats)
        m.register_buffer("view_mu", torch.zeros(d_in))
        m.register_buffer("view_sd", torch.ones(d_in))
    else:
        m.view_mu = m.view_sd = None
    m.skip = None
    if cfg.linear_skip != "none":
        m.skip = nn.Linear(d_in, d)
        nn.init.zeros_(m.skip.weight)
        nn.init.zeros_(m.skip.bias)
        m.skip.requires_grad_(cfg.linear_trainable)
    return d_in


def _view_features(m: nn.Module, x: torch.Tensor, standardize: bool = True) -> torch.Tensor:
    if not standardize:
        return x
    if m.view_mu is not None:
        return (x - m.view_mu) / m.view_sd
    return (x - m.norm.sig_mu) / m.norm.sig_sd


def _residual_mlp(d_in: int, d_out: int, cfg: ModelConfig, zero_last: bool) -> nn.Sequential:
    """[Dropout →] (Linear → LayerNorm → act [→ Dropout])* → Linear; with ``zero_last`` the last
    layer starts at zero, so that a model with a linear path starts as that path."""
    layers: list[nn.Module] = [nn.Dropout(cfg.input_dropout)] if cfg.input_dropout > 0 else []
    prev = d_in
    for h in cfg.mlp_hidden:
        layers += [nn.Linear(prev, h), nn.LayerNorm(h), _ACT[cfg.activation]()]
        if cfg.dropout > 0:
            layers.append(nn.Dropout(cfg.dropout))
        prev = h
    layers.append(nn.Linear(prev, d_out))
    if zero_last:
        nn.init.zeros_(layers[-1].weight)
        nn.init.zeros_(layers[-1].bias)
    return nn.Sequential(*layers)


class MLPPredictor(nn.Module):
    """Mean-pooled signature → Linear → [LayerNorm → act → Linear]… → d (the seed's MLP).

    With hidden (1024, 512, 1024) and d = 2048: 5,252,608 parameters.

    With ``linear_skip`` a linear path runs beside the MLP (``pooled = skip(x) + net(x)``) and
    the MLP's last layer starts at zero: the predictor starts as a linear map (the train-split
    ridge solution with ``"ridge"``, see :mod:`codejepa.predict.ridge`) and learns a residual.
    With an empty ``mlp_hidden`` and a skip, the predictor is the linear map alone.
    """

    def __init__(self, d: int, cfg: ModelConfig, pooled_space: str = "standardized", standardize_input: bool = True,
                 score_space: str = "pooled") -> None:
        super().__init__()
        self.norm = Normaliser(d, pooled_space, score_space)
        self.standardize_input = standardize_input
        d_in = _pooled_views(self, d, cfg)
        self.net: nn.Sequential | None = None
        if self.skip is None or cfg.mlp_hidden:
            self.net = _residual_mlp(d_in, d, cfg, zero_last=self.skip is not None)

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The input the network sees: the pooled input views (the pooled signature by default),
        standardised with train statistics unless ``standardize_input`` is off (the seed)."""
        return _view_features(self, batch["sig"], self.standardize_input)

    def forward(self, batch: dict[str, torch.Tensor], reveal: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        x = self.features(batch)
        y = self.skip(x) if self.skip is not None else None
        if self.net is not None:
            y = self.net(x) if y is None else y + self.net(x)
        assert y is not None
        return {"pooled": y}

    def raw(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.norm.pooled_to_raw(out["pooled"])


class Block(nn.Module):
    """Pre-LN transformer block, bidirectional attention with a key padding mask."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        hidden = int(mlp_ratio * width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :],
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln2(x))


class TransformerPredictor(nn.Module):
    """I-JEPA-style predictor: input tokens (projected, + segment + position embeddings) and
    K learned mask tokens (+ slot embeddings) go through a small transformer; the outputs at
    the K slots are projected back to the teacher's width.

    K is fixed by the config, so the body's length never reaches the model. In multi-block
    training some slots are revealed (their true pooled body states, projected) and the
    others are predicted; at evaluation every slot is a mask token.

    With ``linear_skip`` the pooled prediction is a residual on a linear path, as in the MLP:
    ``pooled = skip(views) [+ mlp(views)] + head(mean of the slot outputs)``, the last layers
    starting at zero, and the mask tokens are conditioned on the pooled views. Started from
    the train ridge solution, the transformer starts at the ridge baseline and its attention
    over the input tokens only has to find what the pooled views miss.
    """

    def __init__(self, d: int, cfg: ModelConfig, input_token_ln: bool = False, reveal_slots: bool = False,
                 pooled_space: str = "standardized", score_space: str = "pooled") -> None:
        super().__init__()
        W, K = cfg.width, cfg.body_slots
        self.input_token_ln, self.max_pos = input_token_ln, cfg.max_input_tokens
        self.norm = Normaliser(d, pooled_space, score_space)
        self.in_proj = nn.Linear(d, W)
        # Only multi-block training reveals body slots; without it the layer would be unused.
        self.body_proj = nn.Linear(d, W) if reveal_slots else None
        self.seg_emb = nn.Embedding(N_SEGMENTS, W)
        self.pos_emb = nn.Embedding(cfg.max_input_tokens, W)
        self.slot_emb = nn.Parameter(torch.zeros(K, W))
        self.mask_token = nn.Parameter(torch.zeros(W))
        self.blocks = nn.ModuleList(Block(W, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth))
        self.ln_f = nn.LayerNorm(W)
        self.out = nn.Linear(W, d)
        d_in = _pooled_views(self, d, cfg)
        self.view_proj = self.head = self.net = None
        if self.skip is not None:
            self.view_proj = nn.Linear(d_in, W)
            self.head = nn.Linear(W, d)
            if cfg.mlp_hidden:
                self.net = _residual_mlp(d_in, d, cfg, zero_last=True)
        self.apply(self._init)
        nn.init.normal_(self.slot_emb, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for blk in self.blocks:  # residual projections scaled by depth (GPT-2)
            nn.init.normal_(blk.proj.weight, std=0.02 / math.sqrt(2 * cfg.depth))
        if self.head is not None:
            nn.init.zeros_(self.skip.weight)  # `apply` above drew it at random
            nn.init.zeros_(self.head.weight)
            if self.net is not None:
                nn.init.zeros_(self.net[-1].weight)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, batch: dict[str, torch.Tensor], reveal: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        tok, seg, pos = batch["tok"].float(), batch["tok_seg"], batch["tok_pos"]
        n = self.norm
        x = F.layer_norm(tok, tok.shape[-1:]) if self.input_token_ln else (tok - n.in_mu) / n.in_sd
        h = self.in_proj(x) + self.seg_emb(seg) + self.pos_emb(pos.clamp(max=self.max_pos - 1))
        B, K = tok.shape[0], self.slot_emb.shape[0]
        slots = (self.mask_token + self.slot_emb + self.seg_emb.weight[SEG_BODY_MASKED]).expand(B, K, -1)
        x_views = None
        if self.skip is not None:
            x_views = self.features(batch)
            slots = slots + self.view_proj(x_views)[:, None]
        if reveal is not None:
            if self.body_proj is None:
                raise ValueError("this predictor was built without multi-block masking (mask.strategy = full)")
            shown = self.body_proj(n.slots_to_norm(batch["slots"].float())) + self.slot_emb + self.seg_emb.weight[SEG_BODY_REVEALED]
            slots = torch.where(reveal[..., None], shown, slots)
        z = torch.cat([h, slots], dim=1)
        keep = torch.cat([seg != SEG_PAD, torch.ones(B, K, dtype=torch.bool, device=seg.device)], dim=1)
        for blk in self.blocks:
            z = blk(z, keep)
        zs = self.ln_f(z[:, -K:])
        pred = self.out(zs)
        if x_views is not None:
            pooled = self.skip(x_views) + self.head(zs.mean(1))
            if self.net is not None:
                pooled = pooled + self.net(x_views)
            return {"slots": pred, "pooled": pooled}
        pooled_raw = pred.mean(1) * n.tok_sd + n.tok_mu
        return {"slots": pred, "pooled": n.body_to_norm(pooled_raw)}

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The pooled input views, standardised with train statistics (the linear path's input)."""
        return _view_features(self, batch["sig"])

    def raw(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.norm.pooled_to_raw(out["pooled"])


def build_model(cfg: PredictConfig, d: int) -> nn.Module:
    if cfg.model.kind == "mlp":
        return MLPPredictor(d, cfg.model, cfg.norm.pooled_space, cfg.norm.standardize_input, cfg.loss.space)
    return TransformerPredictor(d, cfg.model, cfg.norm.input_token_ln, cfg.mask.strategy == "multiblock",
                                cfg.norm.pooled_space, cfg.loss.space)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (normalisation buffers are not parameters)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
