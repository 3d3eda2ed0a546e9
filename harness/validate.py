"""`harness validate`: specs checked without torch and without weights (a cold start of a
second or so, fit for a pre-commit hook). Answers and foils are checked with the `tokenizers`
library on each model's tokenizer.json (local directories, the zoo, the HF cache); a model whose
tokenizer is not on disk is checked when the suite runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from harness.errors import SpecError
from harness.prompts import corrupt_length_mismatches
from harness.spec import Spec, read_spec, resolve_prompts


def token_errors(spec: Spec, tokenizer_for: Callable[[str], object | None],
                 pieces_of: Callable[[object, str], int | list[str]],
                 hf_view: Callable[[object], object] = lambda t: t) -> list[SpecError]:
    """Every answer, foil and span marker must be one token for each model that reads it, and
    clean/corrupt pairs must tokenize to equal lengths. One check for `harness validate` (light
    `tokenizers`) and `runner.check_tokens` (HF tokenizers): `tokenizer_for` gives a model's
    tokenizer (None: not available, left for claim time); `pieces_of` gives the id of a
    one-token text or how it splits; `hf_view` shows a tokenizer as HF's call/decode API."""
    errors: dict[str, SpecError] = {}
    tokenizers: dict[str, object | None] = {}
    for index, claim in enumerate(spec.claims):
        for name in claim.model_names():
            if name not in tokenizers:
                tokenizers[name] = tokenizer_for(name)
            tokenizer = tokenizers[name]
            if tokenizer is None:
                continue
            prompts = spec.claim_prompts(claim)
            for _, other in claim.other_prompt_sets():   # reference, control sets
                prompts += spec.prompt_set(other)
            for prompt in prompts if claim.reads_answers() else ():
                for field_name in ("answer", "foil"):
                    text = getattr(prompt, field_name)
                    if text is None:
                        continue
                    pieces = pieces_of(tokenizer, text)
                    if isinstance(pieces, list):
                        error = spec.error(
                            prompt.loc + (field_name,),
                            f"{field_name} {text!r} is {len(pieces)} tokens for model "
                            f"'{name}': {pieces}; use a single token (often with a leading "
                            "space)")
                        errors.setdefault(str(error), error)
            marker = getattr(getattr(claim, "span", None), "after", None)
            if marker is not None and isinstance(pieces_of(tokenizer, marker), list):
                pieces = pieces_of(tokenizer, marker)
                error = spec.error(("claims", index, "span", "after"),
                                   f"span marker {marker!r} is {len(pieces)} tokens for "
                                   f"model '{name}': {pieces}; use a single token")
                errors.setdefault(str(error), error)
            if claim.pairs_clean_and_corrupt():
                prepend = spec.defaults.prepend_bos if claim.prepend_bos is None \
                    else claim.prepend_bos
                for problem in corrupt_length_mismatches(hf_view(tokenizer),
                                                         spec.claim_prompts(claim), prepend):
                    error = spec.error(("claims", index), f"model '{name}': {problem}")
                    errors.setdefault(str(error), error)
    return list(errors.values())


class _Light:
    """The slice of an HF tokenizer that prompts.corrupt_length_mismatches reads, over a
    `tokenizers.Tokenizer` (the BOS id only shifts both texts alike)."""

    bos_token_id = 0

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": self.tokenizer.encode(text, add_special_tokens=False).ids}

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def validate_spec(path: Path, allow_remote_code: bool = False) -> Spec:
    """The stages of `runner.load_and_check` without torch: read, resolve the prompts, the
    static checks against config and tokenizer files, and the token checks with light
    tokenizers (clean/corrupt token lengths included); raises the first SpecError (the others
    attached)."""
    from harness.static_checks import check_spec

    spec = resolve_prompts(read_spec(path))
    errors = check_spec(spec, allow_remote_code) or \
        token_errors(spec, lambda name: light_tokenizer(spec, name), light_pieces, _Light)
    if errors:
        errors[0].others = errors[1:]
        raise errors[0]
    return spec


def light_tokenizer(spec: Spec, name: str):
    """A `tokenizers.Tokenizer` for a model of the spec, or None when its tokenizer is not on
    disk (a hub model not in the cache, a tokenizer without a fast version, a zoo model not
    built); a GGUF file's is built from its header (cached by the header's content)."""
    from tokenizers import Tokenizer

    from harness.sources import base_of, locate

    name = base_of(spec.models, name)       # a trained model has its base's
    if name is None:
        return None
    found = locate(spec.models[name], spec.directory)
    if found.problem:                       # the run says so
        return None
    if found.gguf_file is not None:
        from harness.errors import HarnessError
        from harness.gguf_files import light_tokenizer as gguf_tokenizer

        try:
            return gguf_tokenizer(found.gguf_file)
        except HarnessError:                # a broken file of an optional model: it skips
            return None
    path = found.tokenizer_file
    return None if path is None else Tokenizer.from_file(str(path))


def light_pieces(tokenizer, text: str) -> int | list[str]:
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if len(ids) == 1:
        return ids[0]
    return [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
