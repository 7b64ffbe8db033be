"""Stable Cascade (Würstchen v3) weights both ways: the StableCascade repository's checkpoints
(``modules/stage_c.py``, ``stage_b.py``: ``nn.MultiheadAttention`` with a joint ``in_proj``) and
diffusers' ``StableCascadeUNet`` layout (``to_q/k/v``, ``to_out.0``; Stage B's ``clip_mapper`` named
``clip_txt_pooled_mapper``) to ``StageC3`` / ``StageB3``, and back. Values are unchanged except that
the joint attention projection is split into (or rebuilt from) its q, k, v thirds, so a round trip is
bit-exact. ``python -m weights.convert`` and ``weights.export_diffusers`` use these.
"""
from __future__ import annotations

import re

import torch

from stages.stable_cascade import CascadeConfig, StageB3, StageC3

LAYOUTS = ("stablecascade", "diffusers")
# the release's order of the timestep blocks' extra conditions (a state dict's key order is not kept)
T_COND_ORDER = ("sca", "crp")
# our top-level names -> the release's (Stage B's pooled map is clip_mapper there, clip_txt_pooled_mapper in diffusers)
_TOP = {"pooled_mapper.": "clip_txt_pooled_mapper.", "text_mapper.": "clip_txt_mapper.",
        "image_mapper.": "clip_img_mapper.", "semantic_mapper.": "effnet_mapper.", "pixels_mapper.": "pixels_mapper.",
        "embedding.": "embedding.", "down_scalers.": "down_downscalers.", "up_scalers.": "up_upscalers.",
        "down_blocks.": "down_blocks.", "up_blocks.": "up_blocks.", "down_repeat_mappers.": "down_repeat_mappers.",
        "up_repeat_mappers.": "up_repeat_mappers.", "head.": "clf."}
_ATTN = re.compile(r"^((?:down|up)_blocks\.\d+\.\d+)\.to_(q|k|v|out)\.(weight|bias)$")


def is_stable_cascade(state: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict is a Stable Cascade Stage C or B (release or diffusers layout), not a v2 one
    (v2's prior has ``cond_mapper``, its decoder ``effnet_mappers`` in the plural)."""
    return "clip_txt_pooled_mapper.weight" in state or "effnet_mapper.0.weight" in state


def cascade_stage(state: dict[str, torch.Tensor]) -> str:
    """``stage_c`` or ``stage_b`` of a Stable Cascade state dict (Stage B adds the compressor latents at its input)."""
    return "stage_b" if "effnet_mapper.0.weight" in state else "stage_c"


def _count(state, pattern: str) -> int:
    return sum(1 for k in state if re.fullmatch(pattern, k))


def config_from_release(state: dict[str, torch.Tensor], config: dict | None = None) -> CascadeConfig:
    """Our config from a Stable Cascade state dict (and a diffusers ``config.json`` when given).

    Without a config: attention heads are width // 64 (every release), the patch size is 2 for Stage B
    and 1 for Stage C, dropout the release's and ``t_conds`` in the release's order (sca, crp).
    """
    config = config or {}
    if "embedding.1.weight" not in state or "clf.1.weight" not in state:
        raise ValueError("no embedding.1.* / clf.1.* keys: not a Stable Cascade Stage C or B state dict")
    stage_b = cascade_stage(state) == "stage_b"
    pooled_key = next((k for k in ("clip_txt_pooled_mapper.weight", "clip_mapper.weight") if k in state), None)
    if pooled_key is None:
        raise ValueError("no clip_txt_pooled_mapper / clip_mapper weights: not a Stable Cascade Stage C or B "
                         "state dict")
    n = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"down_blocks\.(\d+)\.", k)))
    widths = [state["embedding.1.weight"].shape[0]]
    resample = "pointwise"
    for i in range(1, n):
        w = state.get(f"down_downscalers.{i}.1.blocks.0.weight")
        if w is None:
            w, resample = state[f"down_downscalers.{i}.1.weight"], "strided"
        widths.append(w.shape[0])
    has_attn = [any(re.match(rf"down_blocks\.{i}\.\d+\.kv_mapper\.", k) for k in state) for i in range(n)]
    given_heads = config.get("num_attention_heads", [max(1, w // 64) for w in widths])
    heads = [h if a else 0 for h, a in zip(given_heads, has_attn)]
    blocks_down = [_count(state, rf"down_blocks\.{i}\.\d+\.depthwise\.weight") for i in range(n)]
    blocks_up = [_count(state, rf"up_blocks\.{n - 1 - i}\.\d+\.depthwise\.weight") for i in range(n)]
    repeats_down = [1 + _count(state, rf"down_repeat_mappers\.{i}\.\d+\.weight") for i in range(n)]
    repeats_up = [1 + _count(state, rf"up_repeat_mappers\.{n - 1 - i}\.\d+\.weight") for i in range(n)]
    conds = {m.group(1) for k in state if (m := re.fullmatch(r"down_blocks\.0\.1\.mapper_(\w+)\.weight", k))}
    t_conds = config.get("timestep_conditioning_type") or [c for c in T_COND_ORDER if c in conds] + sorted(
        conds - set(T_COND_ORDER))
    c_seq = config.get("clip_seq", 4)
    kv = next((v for k, v in state.items() if k.endswith(".kv_mapper.1.weight")), None)
    patch = config.get("patch_size", 2 if stage_b else 1)
    dropout = config.get("dropout", ([0.0, 0.0, 0.1, 0.1] if stage_b else [0.1, 0.1]) if n in (2, 4) else [0.0] * n)
    dropout = [dropout] * n if isinstance(dropout, (int, float)) else list(dropout)
    if len(dropout) != n:
        dropout = [0.0] * n
    timestep = state["down_blocks.0.1.mapper.weight"]
    return CascadeConfig(
        widths=tuple(widths), heads=tuple(heads), blocks_down=tuple(blocks_down), blocks_up=tuple(blocks_up),
        repeats_down=tuple(repeats_down), repeats_up=tuple(repeats_up), resample=resample,
        c_latent=state["embedding.1.weight"].shape[1] // patch ** 2, patch_size=patch,
        c_cond=kv.shape[1] if kv is not None else state[pooled_key].shape[0] // c_seq, c_r=timestep.shape[1],
        t_conds=tuple(t_conds), c_text=_width(state, "clip_txt_mapper.weight"), c_pooled=state[pooled_key].shape[1],
        c_image=_width(state, "clip_img_mapper.weight"), c_seq=c_seq,
        c_semantic=_width(state, "effnet_mapper.0.weight"), c_pixels=_width(state, "pixels_mapper.0.weight"),
        kernel_size=state["down_blocks.0.0.depthwise.weight"].shape[-1], dropout=tuple(float(d) for d in dropout),
        self_attn=config.get("self_attn", True) if not isinstance(config.get("self_attn"), list)
        else config["self_attn"][0])


def _width(state: dict[str, torch.Tensor], key: str) -> int | None:
    return state[key].shape[1] if key in state else None


def from_release(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Stable Cascade state dict (either layout) to ``StageC3`` / ``StageB3`` keys."""
    inverse = {v: k for k, v in _TOP.items()}
    inverse["clip_mapper."] = "pooled_mapper."
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        top = key.split(".", 1)[0] + "."
        if top not in inverse:
            raise ValueError(f"unexpected key {key!r}: not a Stable Cascade Stage C or B state dict")
        new = inverse[top] + key[len(top):]
        new = re.sub(r"^((?:down|up)_scalers\.\d+\.1)\.blocks\.[01]\.", r"\1.", new)  # 1x1 conv (no interpolation)
        if m := re.match(r"^(.*)\.attention\.attn\.in_proj_(weight|bias)$", new):
            for name, third in zip("qkv", value.chunk(3, dim=0)):
                out[f"{m.group(1)}.to_{name}.{m.group(2)}"] = third
            continue
        new = re.sub(r"\.attention\.attn\.out_proj\.", ".to_out.", new)
        new = re.sub(r"\.attention\.to_out\.0\.", ".to_out.", new)
        new = re.sub(r"\.attention\.to_(q|k|v)\.", r".to_\1.", new)
        out[new] = value
    return out


def to_release(model: StageC3 | StageB3, layout: str = "diffusers") -> dict[str, torch.Tensor]:
    """Our state dict in the StableCascade repository's layout (``stablecascade``) or diffusers' (``diffusers``)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {list(LAYOUTS)}")
    release = layout == "stablecascade"
    stage_b = isinstance(model, StageB3)
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if m := _ATTN.match(key):
            block, which, kind = m.groups()
            block = _TOP[block.split(".", 1)[0] + "."] + block.split(".", 1)[1]
            if not release:
                out[f"{block}.attention.{'to_out.0' if which == 'out' else 'to_' + which}.{kind}"] = value
            elif which == "out":
                out[f"{block}.attention.attn.out_proj.{kind}"] = value
            elif which == "q":  # the joint in_proj: q, k, v stacked
                prefix = key[:-len(f"to_q.{kind}")]
                out[f"{block}.attention.attn.in_proj_{kind}"] = torch.cat(
                    [state[f"{prefix}to_{n}.{kind}"] for n in "qkv"], dim=0)
            continue
        top = key.split(".", 1)[0] + "."
        new = ("clip_mapper." if release and stage_b and top == "pooled_mapper." else _TOP[top]) + key[len(top):]
        if model.config.resample == "pointwise":  # UpDownBlock2d: [conv, interpolation] down, [interpolation, conv] up
            new = re.sub(r"^down_downscalers\.(\d+)\.1\.", r"down_downscalers.\1.1.blocks.0.", new)
            new = re.sub(r"^up_upscalers\.(\d+)\.1\.", r"up_upscalers.\1.1.blocks.1.", new)
        out[new] = value
    return out


def diffusers_config(cfg: CascadeConfig) -> dict:
    """The ``StableCascadeUNet`` config (``config.json``) of one of our configs."""
    n = len(cfg.widths)
    types = [["SDCascadeResBlock", "SDCascadeTimestepBlock"] + (["SDCascadeAttnBlock"] if h else [])
             for h in cfg.heads]
    return {"_class_name": "StableCascadeUNet", "in_channels": cfg.c_latent, "out_channels": cfg.c_latent,
            "timestep_ratio_embedding_dim": cfg.c_r, "patch_size": cfg.patch_size, "conditioning_dim": cfg.c_cond,
            "block_out_channels": list(cfg.widths), "num_attention_heads": list(cfg.heads),
            "down_num_layers_per_block": list(cfg.blocks_down), "up_num_layers_per_block": list(cfg.blocks_up)[::-1],
            "down_blocks_repeat_mappers": list(cfg.repeats_down),
            "up_blocks_repeat_mappers": list(cfg.repeats_up)[::-1],
            "block_types_per_layer": types, "clip_text_in_channels": cfg.c_text,
            "clip_text_pooled_in_channels": cfg.c_pooled, "clip_image_in_channels": cfg.c_image,
            "clip_seq": cfg.c_seq, "effnet_in_channels": cfg.c_semantic, "pixel_mapper_in_channels": cfg.c_pixels,
            "kernel_size": cfg.kernel_size, "dropout": list(cfg.dropout), "self_attn": cfg.self_attn,
            "timestep_conditioning_type": list(cfg.t_conds),
            "switch_level": [False] * (n - 1) if cfg.resample == "pointwise" else None}


def check_diffusers_expressible(cfg: CascadeConfig) -> None:
    """Refuse what ``StableCascadeUNet``'s forward cannot compute: it uses text states only with an image slot."""
    if bool(cfg.c_text) != bool(cfg.c_image):
        raise ValueError("diffusers' StableCascadeUNet reads text states only together with image embeddings; this "
                         f"network has c_text={cfg.c_text}, c_image={cfg.c_image}: give it both or neither")

