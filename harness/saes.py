"""Sparse autoencoders read straight from their files (SAELens and EleutherAI sparsify layouts).

SAELens pins TransformerLens < 4, so it cannot be installed beside the bridge; its on-disk
format is simple enough to read: `cfg.json` + `sae_weights.safetensors` (W_enc [d_in, d_sae],
b_enc, W_dec [d_sae, d_in], b_dec, `threshold` for JumpReLU). sparsify saves `cfg.json`
(d_in, k, num_latents, ...) + `sae.safetensors` (encoder.weight [d_sae, d_in], encoder.bias,
W_dec [d_sae, d_in], b_dec) in a folder named after the HF module it reads (`layers.6`).
Everything is converted to one `Sae` with SAELens's orientation.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from harness.errors import HarnessError, ModelUnavailable
from harness.sites import resolve_hook

ARCHITECTURES = ("standard", "jumprelu", "topk")
_ARCH_ALIASES = {"standard": "standard", "relu": "standard", "jumprelu": "jumprelu",
                 "jump_relu": "jumprelu", "topk": "topk", "top_k": "topk"}
SAELENS_WEIGHTS, SPARSIFY_WEIGHTS = "sae_weights.safetensors", "sae.safetensors"


@dataclass
class Sae:
    """One SAE, SAELens orientation: features = act(x' @ W_enc + b_enc), x' = x - b_dec when
    `apply_b_dec_to_input`; reconstruction = features @ W_dec + b_dec."""

    W_enc: Float[Tensor, "d_in d_sae"]
    b_enc: Float[Tensor, " d_sae"]
    W_dec: Float[Tensor, "d_sae d_in"]
    b_dec: Float[Tensor, " d_in"]
    architecture: str = "standard"
    threshold: Float[Tensor, " d_sae"] | None = None   # jumprelu
    k: int | None = None                                # topk
    apply_b_dec_to_input: bool = True
    hook: str | None = None       # bridge hook name (resolved through harness.sites)
    model_name: str | None = None
    layout: str = "saelens"
    origin: str = ""

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def to(self, device) -> Sae:
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device=device, dtype=torch.float32))
        return self

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc
        if self.architecture == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold)
        if self.architecture == "topk":
            top = pre.topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        return torch.relu(pre)

    def decode(self, features: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_in"]:
        return features @ self.W_dec + self.b_dec

    def direction(self, feature: int) -> Float[Tensor, " d_in"]:
        """The unit-norm decoder direction of a feature (what steering adds)."""
        row = self.W_dec[feature]
        return row / row.norm().clamp_min(1e-12)


def load_sae(directory: str | Path, hook: str | None = None) -> Sae:
    """An SAE folder in SAELens or sparsify layout. `hook` overrides the hook in its config.

    Raises ModelUnavailable naming the folder and what is missing.
    """
    directory = Path(directory)
    cfg_file = directory / "cfg.json"
    if not cfg_file.is_file():
        raise ModelUnavailable(f"SAE folder {directory} has no cfg.json (expected SAELens's "
                               f"cfg.json + {SAELENS_WEIGHTS} or sparsify's cfg.json + "
                               f"{SPARSIFY_WEIGHTS})")
    cfg = json.loads(cfg_file.read_text())
    if (directory / SAELENS_WEIGHTS).is_file():
        sae = _from_saelens(cfg, _read(directory / SAELENS_WEIGHTS))
    elif (directory / SPARSIFY_WEIGHTS).is_file():
        sae = _from_sparsify(cfg, _read(directory / SPARSIFY_WEIGHTS), directory.name)
    else:
        raise ModelUnavailable(f"SAE folder {directory} has cfg.json but neither "
                               f"{SAELENS_WEIGHTS} (SAELens) nor {SPARSIFY_WEIGHTS} (sparsify)")
    hook = hook or sae.hook
    if hook is None:
        raise HarnessError(f"SAE {directory} does not say which hook it reads; give `hook:` "
                           "(e.g. blocks.3.hook_resid_pre) on the SAE in the spec")
    sae.hook = resolve_hook(hook)[0]
    sae.origin = str(directory)
    return sae


def _read(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(path)).items()}


def _need(weights: dict, keys: tuple[str, ...], layout: str) -> None:
    missing = [k for k in keys if k not in weights]
    if missing:
        raise ModelUnavailable(f"{layout} SAE weights lack {missing} (found {sorted(weights)})")


def _from_saelens(cfg: dict, w: dict[str, Tensor]) -> Sae:
    meta = cfg.get("metadata") or {}
    arch = _architecture(cfg.get("architecture", "standard"))
    _need(w, ("W_enc", "b_enc", "W_dec", "b_dec"), "SAELens")
    threshold = w.get("threshold")
    if arch == "jumprelu" and threshold is None:
        if "log_threshold" not in w:
            raise ModelUnavailable("SAELens jumprelu SAE has neither `threshold` nor "
                                   "`log_threshold` weights")
        threshold = w["log_threshold"].exp()
    k = cfg.get("k")
    if arch == "topk" and not k:
        raise ModelUnavailable("SAELens topk SAE config has no `k`")
    norm = cfg.get("normalize_activations") or meta.get("normalize_activations")
    if norm not in (None, "none"):
        raise ModelUnavailable(f"SAELens normalize_activations={norm!r} is not supported "
                               "(only SAEs that read raw activations)")
    hook = cfg.get("hook_name") or cfg.get("hook_point") or meta.get("hook_name")
    return Sae(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], arch, threshold,
               int(k) if k else None, bool(cfg.get("apply_b_dec_to_input", True)), hook,
               cfg.get("model_name") or meta.get("model_name"), "saelens")


def _from_sparsify(cfg: dict, w: dict[str, Tensor], folder: str) -> Sae:
    _need(w, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), "sparsify")
    if "W_skip" in w or cfg.get("transcode"):
        raise ModelUnavailable("sparsify transcoders and skip connections are not supported "
                               "(only plain SAEs reconstruct the activation they read)")
    if cfg.get("activation", "topk") != "topk":
        raise ModelUnavailable(f"sparsify activation {cfg['activation']!r} is not supported "
                               "(only topk)")
    return Sae(w["encoder.weight"].T.contiguous(), w["encoder.bias"], w["W_dec"], w["b_dec"],
               "topk", None, int(cfg["k"]), True, sparsify_hook(folder), None, "sparsify")


def sparsify_hook(folder: str) -> str | None:
    """sparsify names an SAE by the HF module whose output it reads: `layers.6` (a decoder
    layer's output, i.e. blocks.6.hook_resid_post), `h.6` for GPT-2. Others need `hook:`."""
    match = re.fullmatch(r"(?:.*\.)?(?:layers|h)\.(\d+)", folder)
    return f"blocks.{match.group(1)}.hook_resid_post" if match else None


def _architecture(name: str) -> str:
    arch = _ARCH_ALIASES.get(str(name).lower())
    if arch is None:
        raise ModelUnavailable(f"SAE architecture {name!r} is not supported; supported: "
                               f"{', '.join(ARCHITECTURES)}")
    return arch


def save_saelens(sae: Sae, directory: str | Path, extra_cfg: dict | None = None) -> Path:
    """Write an SAE in SAELens's layout (what the zoo ships and tests build)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if sae.threshold is not None:
        weights["threshold"] = sae.threshold
    save_file({k: v.detach().contiguous().float() for k, v in weights.items()},
              str(directory / SAELENS_WEIGHTS))
    cfg = {"architecture": sae.architecture, "d_in": sae.d_in, "d_sae": sae.d_sae,
           "hook_name": sae.hook, "model_name": sae.model_name,
           "apply_b_dec_to_input": sae.apply_b_dec_to_input, "dtype": "float32",
           **({"k": sae.k} if sae.k else {}), **(extra_cfg or {})}
    (directory / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return directory


# ----------------------------------------------------------------------------- locations

def sae_location(source, spec_dir: Path) -> Path:
    """The local folder of a spec's SAE source (`path:` relative to the spec's folder)."""
    if source.zoo:
        from harness.zoo.store import zoo_sae

        return zoo_sae(source.zoo)
    if source.path:
        path = (Path(spec_dir) / source.path).resolve()
        if not path.is_dir():
            raise ModelUnavailable(f"SAE folder {path} does not exist (`path:` is relative to "
                                   f"the spec's folder, {spec_dir})")
        return path
    return hub_sae_folder(source.hf, source.folder, source.revision)


def hub_sae_folder(repo: str, folder: str | None, revision: str | None = None) -> Path:
    """Fetch one SAE folder of a hub repo, offline-first like models: with the hub unreachable
    (or HF_HUB_OFFLINE=1) only the local HF cache is tried, at once."""
    from huggingface_hub import snapshot_download

    from harness.hub import hub_offline

    offline = hub_offline()
    try:
        root = snapshot_download(repo, revision=revision, local_files_only=offline,
                                 allow_patterns=[f"{folder}/*"] if folder else None)
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types
        where = " (the hub is unreachable: only the local HF cache was searched)" if offline \
            else ""
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelUnavailable(f"SAE hub repo '{repo}'{where}: {first}") from None
    return Path(root) / folder if folder else Path(root)
