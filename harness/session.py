"""One evaluation session: models loaded once, prompt batches and clean runs shared by claims."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from harness.errors import HarnessError
from harness.models import (
    LoadedModel,
    load_model,
    load_tokenizer,
    pick_device,
    resolve_location,
    source_key,
)
from harness.prompts import PromptBatch, build_batch
from harness.spec import Spec


@dataclass
class Session:
    """State shared by every claim of a run. Front ends create one and pass it along."""

    device: str | None = None            # overrides every model's device when set
    memory_budget_mb: int = 2048
    verbose: bool = True
    update_baselines: bool = False       # baseline comparisons read the new values
    allow_remote_code: bool = False      # a spec's trust_remote_code needs the user's flag too
    limit: int | None = None             # measure each claim on its first N prompts only
    progress: object = None              # progress.ClaimProgress: claims shown as they run
    _models: dict[str, object] = field(default_factory=dict)   # loaded, or why not
    _locations: dict[str, str] = field(default_factory=dict)
    _batches: dict[tuple, PromptBatch] = field(default_factory=dict)
    _provided: dict[str, LoadedModel] = field(default_factory=dict)   # in memory (notebooks)
    _engine: object = None
    _gates: dict[tuple, object] = field(default_factory=dict)
    timing: dict = field(default_factory=lambda: {"import_s": 0.0, "model_load_s": {},
                                                  "first_claim_s": None})
    started: float = field(default_factory=time.perf_counter)

    def provide(self, spec: Spec, name: str, model) -> LoadedModel:
        """Use a model already in memory (a notebook's) for the spec's model `name`: a
        TransformerBridge, a LoadedModel, or an HF causal LM with its tokenizer as a pair."""
        from harness.models import wrap_in_memory

        if name not in spec.models:
            from harness.errors import did_you_mean

            raise HarnessError(f"models: the spec has no model '{name}'"
                               + did_you_mean(name, spec.models)
                               + "; key in-memory models by the spec's model names")
        loaded = wrap_in_memory(name, model)
        self._provided[source_key(spec.models[name], spec.directory)] = loaded
        return loaded

    def model(self, spec: Spec, name: str) -> LoadedModel:
        """The loaded model a spec calls `name`; loads once per session, failures included."""
        provided = self._provided.get(source_key(spec.models[name], spec.directory))
        if provided is not None:
            return provided
        source = self._source(spec, name)
        device = pick_device(source, self.device)
        key = f"{source_key(source, spec.directory)}|{device}"

        def load() -> LoadedModel:
            self._log(f"loading model '{name}' ({source.kind}) on {device}")
            self.timed_import("transformer_lens.model_bridge")
            start = time.perf_counter()
            try:
                return load_model(name, source, self.location(spec, name), device,
                                  self.tokenizer(spec, name))
            finally:
                loads = self.timing["model_load_s"]
                loads[name] = round(loads.get(name, 0.0) + time.perf_counter() - start, 3)
        return self._once(key, load)

    def timed_import(self, module: str) -> None:
        """Import `module`, adding the time it takes (the first time) to `import_s`."""
        if module not in sys.modules:
            import importlib

            start = time.perf_counter()
            importlib.import_module(module)
            self.timing["import_s"] += time.perf_counter() - start

    def note_claim(self, seconds: float) -> None:
        if self.timing["first_claim_s"] is None:
            self.timing["first_claim_s"] = round(seconds, 3)
            self.timing["first_verdict_after_s"] = round(time.perf_counter() - self.started, 3)

    def timing_report(self) -> dict:
        """The JSON report's `timing`: imports, model loads, the first claim, the whole run."""
        return dict(self.timing, import_s=round(self.timing["import_s"], 3),
                    total_s=round(time.perf_counter() - self.started, 3))

    def tokenizer(self, spec: Spec, name: str):
        """A model's tokenizer, loaded once; a `train:` model has its base model's."""
        provided = self._provided.get(source_key(spec.models[name], spec.directory))
        if provided is not None:
            return provided.tokenizer
        while spec.models[name].train is not None:
            name = spec.models[name].train.base
        source = self._source(spec, name)
        return self._once(f"tokenizer|{source_key(source, spec.directory)}",
                          lambda: load_tokenizer(self.location(spec, name), source))

    def _source(self, spec: Spec, name: str):
        """The spec's source of a model; its code runs only when the user allowed it."""
        source = spec.models[name]
        if source.trust_remote_code and not self.allow_remote_code:
            source = source.model_copy(update={"trust_remote_code": False})
        return source

    def _once(self, key: str, load):
        """Load under `key` once per session; a failure is remembered and raised again."""
        if key not in self._models:
            try:
                self._models[key] = load()
            except HarnessError as exc:
                self._models[key] = exc
        found = self._models[key]
        if isinstance(found, HarnessError):
            raise found
        return found

    def location(self, spec: Spec, name: str) -> str:
        """Local directory or hub id of a model (builds `train:` models, cached on disk)."""
        source = spec.models[name]
        key = source_key(source, spec.directory)
        if source.train:   # its base names a model of this spec
            key += f"|{spec.file}"
        if key not in self._locations:
            if source.train:
                self._locations[key] = self._train(spec, name)
            else:
                self._locations[key] = resolve_location(source, spec.directory)
        return self._locations[key]

    def _train(self, spec: Spec, name: str) -> str:
        """Build a `train:` model with its recipe (cached on disk by content)."""
        from harness.train import train_rlhf

        recipe = spec.models[name].train
        base = self.location(spec, recipe.base)
        reward = self.location(spec, recipe.reward) if recipe.reward in spec.models \
            else recipe.reward
        self._log(f"training model '{name}' ({recipe.recipe}, {recipe.steps} steps, seed "
                  f"{recipe.seed}); cached after the first run")
        return str(train_rlhf(recipe.recipe_config(base, reward), progress=self.verbose))

    def batch(self, spec: Spec, prompts, model: LoadedModel, prepend_bos: bool,
              answers: bool = True) -> PromptBatch:
        """The prompts tokenized for a model; `answers=False` (a claim that reads none) leaves
        answers and foils untokenized, so they need not be single tokens."""
        key = (model.key, tuple(p.model_dump_json() for p in prompts), prepend_bos, answers)
        if key not in self._batches:
            def bad_token(prompt, field_name, pieces):
                loc = prompt.loc + (field_name,)
                return spec.error(loc, f"{field_name} {getattr(prompt, field_name)!r} is "
                                       f"{len(pieces)} tokens for this model's tokenizer: "
                                       f"{pieces}; use a single-token {field_name} "
                                       f"(often with a leading space)")
            self._batches[key] = build_batch(model.tokenizer, prompts, prepend_bos, bad_token,
                                             answers)
        return self._batches[key]

    def reward_model(self, spec: Spec, name: str):
        """A sentiment reward model (NEGATIVE/POSITIVE classifier), loaded once."""
        from harness.zoo.reward import SentimentReward

        source = spec.models[name]
        device = pick_device(source, self.device)
        return self._once(f"reward|{source_key(source, spec.directory)}|{device}",
                          lambda: SentimentReward(self.location(spec, name), device=device))

    def sae(self, spec: Spec, name: str, device: str):
        """An SAE of the spec on `device`, loaded once (failures remembered)."""
        from harness.saes import load_sae, sae_location

        source = spec.saes[name]
        key = f"sae|{source.model_dump_json(exclude={'gate', 'model'})}|{spec.directory}|{device}"
        return self._once(key, lambda: load_sae(sae_location(source, spec.directory),
                                                source.hook).to(device))

    def gate(self, key: tuple, compute):
        """The SAE reconstruction check of one (SAE, model, prompts), computed once."""
        if key not in self._gates:
            self._gates[key] = compute()
        return self._gates[key]

    def loaded_models(self) -> list[dict]:
        found = [*self._provided.values(), *self._models.values()]
        return [{"origin": m.origin, "device": m.device, "dtype": m.dtype,
                 "bos": getattr(m.tokenizer, "bos_token", None)}   # what prepend_bos adds
                for m in found if isinstance(m, LoadedModel)]

    @property
    def engine(self):
        if self._engine is None:
            from harness.measure.patching import PatchingEngine

            self._engine = PatchingEngine(memory_budget_mb=self.memory_budget_mb)
        return self._engine

    def _log(self, message: str) -> None:
        if self.verbose:
            print(f"[harness] {message}", file=sys.stderr, flush=True)
