"""The plan spec: pydantic models of the YAML file users write.

``load_spec(path)`` parses, validates and resolves a spec. Errors name the file,
the field path (``stages[1].keep``) and, where the YAML parser knows it, the
line. Relative paths are resolved against the spec file's folder. Stage fields
left out inherit the previous stage's value, so a second stage only says what
changes (usually ``proxy`` and ``tokens``).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rbridge.errors import FieldError, InputError
from rbridge.planner.schedule import (NOT_INHERITED, PRUNING_DEFAULTS, Keep, KeepWithin, PruningConfig,
                                      keep_count)
from rbridge.proxy.config import TRAINING_DEFAULTS, ProxyShape, TrainingConfig
from rbridge.scoring.config import ScoreOptions

__all__ = ["Spec", "Stage", "StageSpec", "BenchmarkSpec", "CandidateSpec", "SourceSpec", "TokenizerSpec",
           "TargetModel", "Keep", "KeepWithin", "keep_count", "load_spec", "parse_spec", "stored_stages"]

_STRICT = ConfigDict(extra="forbid", frozen=False)


class TokenizerTrain(BaseModel):
    model_config = _STRICT
    vocab_size: int = Field(8192, ge=259, le=1_000_000)


class TokenizerSpec(BaseModel):
    """Either train a byte-level BPE on the sources, or load a tokenizer directory."""

    model_config = _STRICT
    train: TokenizerTrain | None = None
    path: Path | None = None

    @model_validator(mode="after")
    def _one_of(self):
        if (self.train is None) == (self.path is None):
            raise ValueError("give exactly one of 'train' or 'path'")
        return self


class SourceSpec(BaseModel):
    """Named raw text: one file or `datasets` folder, or a glob of files (rbridge.data.formats).

    ``format`` overrides what the file names imply; ``field`` is the JSON key or
    column holding the text (default ``text``).
    """

    model_config = _STRICT
    path: Path | None = None
    glob: str | None = None
    field: str | None = None
    format: Literal["text", "jsonl", "parquet", "arrow", "files", "tokens"] | None = None
    tokenizer: Path | None = None  # token files: the tokenizer they were made with (the plan must load it)
    dtype: Literal["uint16", "uint32", "int32", "int64"] | None = None  # token files without a header

    def config(self, name: str):
        """The source as rbridge.data reads it (paths already resolved against the spec's folder)."""
        from rbridge.data.sources import SourceConfig

        return SourceConfig(name, path=self.path, field=self.field, glob=self.glob, format=self.format,
                            tokenizer=self.tokenizer, dtype=self.dtype)

    @model_validator(mode="after")
    def _one_of(self):
        if (self.path is None) == (self.glob is None):
            raise ValueError("give exactly one of 'path' or 'glob'")
        return self


class CandidateSpec(BaseModel):
    """A candidate pre-training dataset: a mixture of sources by token share."""

    model_config = _STRICT
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
    mix: dict[str, float]

    @field_validator("mix")
    @classmethod
    def _shares(cls, mix: dict[str, float]) -> dict[str, float]:
        if not mix:
            raise ValueError("a mixture needs at least one source")
        for source, share in mix.items():
            if not (share > 0):
                raise ValueError(f"share of '{source}' must be > 0, got {share}")
        total = sum(mix.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"token shares must sum to 1, they sum to {total:.6g}")
        return mix


class SearchSpec(BaseModel):
    """A mixture search (rbridge.mixtures, docs/MIXTURES.md): a swarm of random mixtures of the searched
    sources trained as candidates ``swarm-000``, ... in the plan's first stage, beside the listed ones."""

    model_config = _STRICT
    sources: list[str] | None = Field(None, min_length=1, description="the sources searched (default: all)")
    swarm: int = Field(24, ge=1, le=100000, description="how many random mixtures")
    prior: Literal["tokens", "uniform"] | dict[str, float] = Field("tokens", description=(
        "the mixture the swarm is drawn around: tokens (each source's share of the searched sources' training "
        "tokens, as RegMix and olmix), uniform, or explicit weights by source"))
    strengths: list[float] = Field([0.1, 0.3, 1.0, 3.0, 10.0], min_length=1, description=(
        "Dirichlet strengths, cycled over the draws: small ones give sparse mixtures, large ones mixtures near "
        "the prior"))
    min_weight: float = Field(0.0, ge=0, lt=1, description="a drawn weight below this is set to 0")
    max_repeats: float | None = Field(None, gt=0, description=(
        "how many times a source's training tokens may be repeated at the largest stage (caps its weight)"))
    seed: int | None = Field(None, description="the swarm's seed (default: the spec's seed)")
    propose: int = Field(2, ge=0, le=100, description=(
        "mixtures proposed from the surrogate once the search stage is decided; they join the next proxy "
        "stage as proposed-1, ... beside the survivors and the listed candidates"))
    surrogate: Literal["auto", "linear", "log_linear", "lightgbm"] = Field("auto", description=(
        "the surrogate family; auto: the best k-fold cross-validated Spearman on the search stage's scores"))
    stage: str | None = Field(None, description="the stage whose scores are fitted (default: the first stage)")

    @field_validator("strengths")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(not (x > 0) for x in v):
            raise ValueError("strengths must be > 0")
        return v

    @field_validator("prior")
    @classmethod
    def _prior(cls, v):
        if isinstance(v, dict):
            if not v or any(not (w >= 0) for w in v.values()) or sum(v.values()) <= 0:
                raise ValueError("explicit prior weights must be >= 0 and not all 0")
        return v


class BenchmarkSpec(ScoreOptions):
    """A benchmark: its traces and how they are scored (``ScoreOptions``: context, minmax, aggregate).

    ``checker``: how task accuracy is measured (target stages, ``evaluate: [accuracy]``):
    ``number``, greedy generation after the question whose last number (up to the first
    blank line) equals the trace's gold number; ``choices``, multiple-choice cloze accuracy
    (traces with ``choices`` and ``gold``). Default: ``number`` for benchmarks named
    ``gsm8k...``, else none.
    """

    model_config = _STRICT
    name: str = Field(min_length=1)
    traces: Path
    checker: Literal["number", "choices"] | None = None

    @property
    def answer_checker(self) -> str | None:
        if self.checker is not None:
            return self.checker
        return "number" if self.name.lower().startswith("gsm8k") else None


class StageSpec(TrainingConfig, PruningConfig):
    """One stage as written: a proxy shape, training settings and pruning settings, flat in the YAML.

    The fields come from the parts that own them: ``ProxyShape`` and ``TrainingConfig``
    (rbridge.proxy.config), ``PruningConfig`` (rbridge.planner.schedule). Every field
    but ``name`` may be left out and then inherits the previous stage's value (the
    first stage falls back to the parts' defaults); ``Spec.resolved_stages`` returns
    the filled, cross-checked ``Stage`` objects the planner uses.
    """

    model_config = _STRICT
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    proxy: ProxyShape | None = None
    # Never inherited (STAGE_ONLY): what the stage is for, and what it trains and measures.
    role: Literal["proxy", "target"] | None = Field(None, description=(
        "proxy (default): trains small models and prunes; target: trains its model on every candidate it "
        "names, never prunes, and measures task accuracy; its results are the plan's targets"))
    model: ProxyShape | None = Field(None, description="a target stage's model (the same fields as proxy)")
    seeds: list[int] | None = Field(None, min_length=1, description=(
        "training seeds: each candidate is trained once per seed (target stages; the target value is "
        "the mean over seeds)"))
    candidates: list[str] | None = Field(None, min_length=1, description=(
        "a target stage's candidates (default: all of the plan's, pruned or not)"))
    evaluate: list[Literal["accuracy", "label_nll"]] | None = Field(None, description=(
        "metrics beside the scorer's: accuracy (greedy generation or multiple choice, the benchmark's "
        "checker) and label_nll (NLL of the benchmark's gold answer); target stages always measure accuracy"))


STAGE_ONLY = ("role", "model", "seeds", "candidates", "evaluate")
# Task metrics a stage can add (StageSpec.evaluate); higher is better for accuracy only.
TASK_METRICS = ("accuracy", "label_nll")


class Stage(BaseModel):
    """A resolved stage: every setting filled and checked, grouped by the subsystem that uses it.

    A stage written with several ``seeds`` resolves to one Stage per seed, named
    ``<group>.s<seed>`` (``group`` is the name as written); each is trained, scored and
    resumed as a stage of its own.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    index: int
    proxy: ProxyShape
    training: TrainingConfig
    pruning: PruningConfig
    role: Literal["proxy", "target"] = "proxy"
    group: str = ""
    seed: int = 0
    candidates: tuple[str, ...] | None = None
    evaluate: tuple[str, ...] = ()

    @property
    def is_target(self) -> bool:
        return self.role == "target"

    def run_settings(self) -> dict[str, Any]:
        """What a run's numbers depend on besides its data: training settings and the rungs.

        Stored in runs.config and hashed into run fingerprints (with the proxy shape). The role,
        seed and extra metrics appear only where they differ from a plain proxy stage's, so the
        fingerprints of runs recorded before they existed stay the same.
        """
        out = {**self.training.run_settings(), "evals": self.pruning.evals}
        if self.is_target:
            out["role"] = "target"
        if self.seed:
            out["seed"] = self.seed
        if self.evaluate:
            out["evaluate"] = list(self.evaluate)
        return out


class TargetModel(BaseModel):
    """The model the plan is choosing data for: its size and tokens price METHOD.md section 7."""

    model_config = _STRICT
    params: float = Field(gt=0)
    tokens: float = Field(gt=0)


class SamplingSpec(BaseModel):
    """How large sources are read (rbridge.data.sample): a source whose files hold more than ``above``
    bytes is sampled, reading only ``margin`` times the most tokens any stage draws from it (plus its
    held-out slice); smaller ones are read whole. ``workers``: tokenizing processes (default: every core)."""

    model_config = _STRICT
    above: int = Field(256 << 20, ge=0)
    margin: float = Field(1.25, ge=1.0)
    workers: int | None = Field(None, ge=1)


class Spec(BaseModel):
    model_config = _STRICT
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    store: str | None = None
    cache: Path | None = None
    seed: int = 0
    heldout_fraction: float = Field(0.05, gt=0, lt=0.5)
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    tokenizer: TokenizerSpec = Field(default_factory=lambda: TokenizerSpec(train=TokenizerTrain()))
    sources: dict[str, SourceSpec]
    candidates: list[CandidateSpec] = Field(default_factory=list)
    search: SearchSpec | None = None
    benchmarks: list[BenchmarkSpec] = Field(min_length=1)
    stages: list[StageSpec] = Field(min_length=1)
    targets: Path | None = None
    target_model: TargetModel | None = None
    checkpoint_minutes: float | None = Field(10.0, gt=0)
    # Disk (rbridge.planner.disk): full checkpoints (weights, optimizer state, data position) a run keeps
    # while it trains, the newest (2: a damaged newest one falls back to the one before, not to step 0);
    # a pruned run keeps its newest one while the plan runs. And what a done or pruned run keeps once
    # the plan no longer needs its training state: "model" (the exported Hugging Face folder alone) or
    # "checkpoint" (its newest full checkpoint too). Neither changes any result.
    keep_checkpoints: int = Field(2, ge=1, le=100)
    finished_runs: Literal["model", "checkpoint"] = "model"
    max_attempts: int = Field(2, ge=1, le=100)  # tries of a run whose training or scoring raises, then failed
    runs_per_gpu: int = Field(1, ge=1, le=64)  # local processes per GPU: small proxies leave most of a GPU idle

    def source_needs(self) -> dict[str, int]:
        """Training tokens each source must supply: the most any stage's candidate draws from it (the
        rows ``build_mixture`` allocates), times ``sampling.margin``."""
        import math

        from rbridge.data.mixture import allocate_rows  # numpy only

        need = {name: 0 for name in self.sources}
        # a searched source may get any weight in a swarm drawn later (from the sources' token counts)
        searched = [CandidateSpec(name=f"search-{i}", mix={src: 1.0})
                    for i, src in enumerate(self.searched_sources())]
        for st in self.resolved_stages():
            seq = st.training.seq_len
            n_rows = -(-st.training.tokens // seq)
            for cand in [*self.candidates, *searched]:
                total = sum(cand.mix.values())
                for src, rows in allocate_rows({k: v / total for k, v in cand.mix.items()}, n_rows).items():
                    need[src] = max(need[src], rows * seq)
        return {name: math.ceil(n * self.sampling.margin) for name, n in need.items()}

    # Filled by load_spec, not by the user.
    path: Path | None = Field(None, exclude=True)
    text: str = Field("", exclude=True, repr=False)

    def searched_sources(self) -> list[str]:
        """The sources a ``search:`` draws mixtures of (none without one)."""
        if self.search is None:
            return []
        return sorted(self.search.sources or self.sources)

    def search_stage(self) -> str | None:
        """The stage whose scores the search's surrogate is fitted on."""
        if self.search is None:
            return None
        return self.search.stage or next(st.name for st in self.stages if st.role != "target")

    def swarm_names(self) -> list[str]:
        """The swarm's candidate names, ``swarm-000`` ... (at least three digits)."""
        if self.search is None:
            return []
        width = max(3, len(str(self.search.swarm - 1)))
        return [f"swarm-{i:0{width}d}" for i in range(self.search.swarm)]

    @model_validator(mode="after")
    def _cross_checks(self):
        if not self.candidates and self.search is None:
            raise FieldError(("candidates",), "a plan needs candidates, or a search: that draws them")
        if self.search is not None:
            for i, src in enumerate(self.search.sources or []):
                if src not in self.sources:
                    raise FieldError(("search", "sources", i), f"unknown source '{src}' (sources: "
                                                                f"{', '.join(self.sources)})")
            if isinstance(self.search.prior, dict):
                for src in self.search.prior:
                    if src not in self.searched_sources():
                        raise FieldError(("search", "prior", src), f"'{src}' is not a searched source "
                                                                    f"({', '.join(self.searched_sources())})")
            for i, cand in enumerate(self.candidates):
                if cand.name.startswith(("swarm-", "proposed-")):
                    raise FieldError(("candidates", i, "name"), "names starting with swarm- or proposed- are the "
                                                                "search's")
            proxies = [st.name for st in self.stages if st.role != "target"]
            at = self.search.stage or (proxies[0] if proxies else None)
            if self.search.stage is not None and self.search.stage not in proxies:
                raise FieldError(("search", "stage"), f"not a proxy stage of this spec ({', '.join(proxies)})")
            if self.search.propose and at is not None and proxies.index(at) == len(proxies) - 1:
                raise FieldError(("search", "propose"), f"proposals join the proxy stage after {at!r}, and there "
                                                        "is none: add a stage after it, or set propose: 0")
        counts = Counter(c.name for c in self.candidates)  # not names.count(n) per name: O(n^2) on 5,000
        dupes = sorted(n for n, k in counts.items() if k > 1)
        if dupes:
            raise ValueError(f"candidate names must be unique: {', '.join(dupes)}")
        for i, cand in enumerate(self.candidates):
            for source in cand.mix:
                if source not in self.sources:
                    raise FieldError(("candidates", i, "mix", source),
                                      f"unknown source '{source}' (sources: {', '.join(self.sources)})")
        stage_names = [s.name for s in self.stages]
        if len(set(stage_names)) != len(stage_names):
            raise ValueError("stage names must be unique")
        bench_names = [b.name for b in self.benchmarks]
        if len(set(bench_names)) != len(bench_names):
            raise ValueError("benchmark names must be unique")
        names = set(counts)
        for i, stage in enumerate(self.stages):
            target = stage.role == "target"
            if not target:
                for key in ("model", "candidates"):
                    if getattr(stage, key) is not None:
                        raise FieldError(("stages", i, key), f"{key} is for target stages (role: target)")
                if stage.seeds is not None and len(stage.seeds) > 1:
                    raise FieldError(("stages", i, "seeds"), "a proxy stage prunes on one seed; several seeds "
                                                             "are for target stages (role: target)")
            else:
                for key in ("keep", "reduction_factor"):
                    if getattr(stage, key) is not None:
                        raise FieldError(("stages", i, key), "a target stage never prunes: remove " + key)
                if stage.model is not None and stage.proxy is not None:
                    raise FieldError(("stages", i, "model"), "give the target's model under model: or proxy:, "
                                                             "not both")
            if stage.seeds is not None and len(set(stage.seeds)) != len(stage.seeds):
                raise FieldError(("stages", i, "seeds"), "seeds must be unique")
            if stage.seeds is not None and any(x < 0 for x in stage.seeds):
                raise FieldError(("stages", i, "seeds"), "seeds must be non-negative")
            for j, cand in enumerate(stage.candidates or []):
                if cand not in names:
                    raise FieldError(("stages", i, "candidates", j), f"unknown candidate {cand!r}")
            if target or "accuracy" in (stage.evaluate or []):
                for k, bench in enumerate(self.benchmarks):
                    if bench.answer_checker is None:
                        raise FieldError(("benchmarks", k, "checker"), (
                            f"stage {stage.name!r} measures task accuracy, and benchmark {bench.name!r} has no "
                            "answer checker: set checker: number (last number of the greedy answer vs the "
                            "gold answer) or checker: choices (multiple choice)"))
        if not any(s.role != "target" for s in self.stages):
            raise FieldError(("stages",), "a plan needs at least one proxy stage (role: proxy, the default)")
        return self

    def resolved_stages(self) -> list[Stage]:
        """Stages with every field filled (inherited from the previous stage, else defaulted) and checked."""
        out: list[Stage] = []
        prev: dict[str, Any] = {**TRAINING_DEFAULTS, **PRUNING_DEFAULTS}
        seen: set[str] = set()
        for i, stage in enumerate(self.stages):
            values = stage.model_dump(exclude={"name", *STAGE_ONLY})
            if stage.model is not None:
                values["proxy"] = stage.model.model_dump()
            for key, value in values.items():
                if value is None and key in prev and key not in NOT_INHERITED:
                    values[key] = prev[key]
            for key in ("proxy", "tokens"):
                if values[key] is None:
                    raise FieldError(("stages", i, key), f"the first stage must declare {key}")
            try:
                training = TrainingConfig(**{k: values[k] for k in TrainingConfig.model_fields})
                training.check_complete()
                pruning = PruningConfig(**{k: values[k] for k in PruningConfig.model_fields})
            except FieldError as exc:
                raise FieldError(("stages", i, *exc.loc), str(exc)) from None
            proxy = ProxyShape(values["proxy"])
            try:
                proxy.llama_values(training.seq_len)
            except FieldError as exc:
                raise FieldError(("stages", i, "proxy", *exc.loc), str(exc)) from None
            target = stage.role == "target"
            seeds = stage.seeds or [0]
            evaluate = tuple(m for m in TASK_METRICS if m in (stage.evaluate or []) or (target and m == "accuracy"))
            for seed in seeds:
                name = stage.name if len(seeds) == 1 else f"{stage.name}.s{seed}"
                if name in seen:
                    raise FieldError(("stages", i, "name"), f"stage name {name!r} is used twice (a stage with "
                                                            "several seeds is named <name>.s<seed>)")
                seen.add(name)
                out.append(Stage(name=name, index=i, proxy=proxy, training=training, pruning=pruning,
                                 role=stage.role or "proxy", group=stage.name, seed=seed,
                                 candidates=tuple(stage.candidates) if stage.candidates else None,
                                 evaluate=evaluate))
            prev = values
        return out

    def warnings(self) -> list[str]:
        """Settings that are valid but probably not what was meant (printed by validate and plan)."""
        out = []
        entrants = len(self.candidates) + (self.search.swarm if self.search else 0)
        for st in self.resolved_stages():
            if st.is_target:
                continue
            keep = st.pruning.keep
            if isinstance(keep, int) and keep > entrants:
                out.append(f"stages[{st.index}].keep: keeps {keep} of the {entrants} candidates that reach stage "
                           f"{st.name!r}, so none is dropped there")
            if isinstance(keep, int):
                entrants = min(entrants, keep)
            if self.search is not None and st.name == self.search_stage():  # proposals and baselines join
                entrants += self.search.propose + len(self.candidates)
        return out

    @property
    def spec_hash(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def _loc_str(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _line_of(root: yaml.Node | None, loc: tuple) -> int | None:
    """Line (1-based) of the YAML node at a pydantic error location, or its nearest parent."""
    node, line, via_key = root, None, False
    for part in loc:
        if node is None:
            break
        line, via_key = node.start_mark.line + 1, False
        if isinstance(node, yaml.MappingNode):
            nxt = None
            for key, value in node.value:
                if key.value == str(part):
                    nxt, line, via_key = value, key.start_mark.line + 1, True
                    break
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            node = None
    if node is not None and not via_key:  # a key's own line, not the first line of the block under it
        line = node.start_mark.line + 1
    return line


def _resolve_paths(spec: Spec, base: Path) -> None:
    def rel(p: Path | None) -> Path | None:
        if p is None:
            return None
        p = Path(p).expanduser()
        return p if p.is_absolute() else (base / p)

    if spec.tokenizer.path is not None:
        spec.tokenizer.path = rel(spec.tokenizer.path)
    for src in spec.sources.values():
        src.path = rel(src.path)
        src.tokenizer = rel(src.tokenizer)
        if src.glob is not None and not Path(src.glob).is_absolute():
            src.glob = str(base / src.glob)
    for bench in spec.benchmarks:
        bench.traces = rel(bench.traces)
    spec.targets = rel(spec.targets)
    spec.cache = rel(spec.cache)
    if spec.store and "://" not in spec.store and not Path(spec.store).is_absolute():
        spec.store = str(base / spec.store)


def _check_files(spec: Spec, path: Path, text: str) -> None:
    def missing(loc: tuple, p: Path):
        raise InputError(f"file not found: {p}", file=path, line=_line_of(_nodes(text), loc), field=_loc_str(loc))

    if spec.tokenizer.path is not None and not spec.tokenizer.path.exists():
        missing(("tokenizer", "path"), spec.tokenizer.path)
    for name, src in spec.sources.items():
        if src.path is not None and not (src.path.is_file() or src.path.is_dir()):
            missing(("sources", name, "path"), src.path)
        if src.tokenizer is not None and not src.tokenizer.is_dir():
            missing(("sources", name, "tokenizer"), src.tokenizer)
        if src.glob is not None:
            import glob as _glob
            if not _glob.glob(src.glob, recursive=True):
                raise InputError(f"glob matches no file: {src.glob}", file=path,
                                 line=_line_of(_nodes(text), ("sources", name, "glob")), field=f"sources.{name}.glob")
    for i, bench in enumerate(spec.benchmarks):
        if not bench.traces.is_file():
            missing(("benchmarks", i, "traces"), bench.traces)
    if spec.targets is not None and not spec.targets.is_file():
        missing(("targets",), spec.targets)


# libyaml's parser when PyYAML was built with it: about ten times faster than the pure-Python one,
# which matters for specs of thousands of candidates (`rbridge status` parses the stored spec).
_FAST_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _load_yaml(text: str) -> Any:
    """``yaml.safe_load`` through libyaml; text libyaml refuses is read again by the pure-Python
    loader, so what is accepted and every error message are PyYAML's own, as before."""
    try:
        return yaml.load(text, Loader=_FAST_LOADER)
    except yaml.YAMLError:
        if _FAST_LOADER is yaml.SafeLoader:
            raise
    return yaml.safe_load(text)


def _nodes(text: str) -> yaml.Node | None:
    """The YAML node tree of spec text, for the line numbers of messages: composed only when a
    message needs one (the text already loaded, so this does not fail)."""
    return yaml.compose(text)


@functools.lru_cache(maxsize=1)
def _known_keys() -> frozenset[str]:
    """Every field name of the spec's models (suggestions for an unknown key)."""
    seen, names, todo = set(), set(), [Spec]
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, f in model.model_fields.items():
            names.add(f.alias or name)
            for arg in _model_args(f.annotation):
                todo.append(arg)
    return frozenset(names)


def _model_args(annotation) -> list:
    import typing

    out, todo = [], [annotation]
    while todo:
        a = todo.pop()
        if isinstance(a, type) and issubclass(a, BaseModel):
            out.append(a)
        todo.extend(typing.get_args(a))
    return out


def parse_spec(text: str, path: Path, check_files: bool = True) -> Spec:
    """Validate spec text that came from ``path`` (used for messages and relative paths)."""
    try:
        data = _load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise InputError(f"not valid YAML: {problem}", file=path, line=line) from None
    if not isinstance(data, dict):
        raise InputError("a spec must be a YAML mapping (name:, sources:, candidates:, ...)", file=path)
    try:
        spec = Spec.model_validate(data)
        spec.resolved_stages()
    except FieldError as exc:
        raise InputError(str(exc), file=path, line=_line_of(_nodes(text), exc.loc), field=_loc_str(exc.loc)) from None
    except ValidationError as exc:
        # An unknown key first: a typo (`candidate:`) also makes the field it misspells missing, and the
        # unknown key is the one that names the typo.
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        err = errors[0]
        loc = tuple(err["loc"])
        ctx_err = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_err, FieldError):
            loc = loc + ctx_err.loc  # relative to the model that raised it (() for the spec itself)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
            near = difflib.get_close_matches(str(loc[-1]), sorted(_known_keys()), n=1, cutoff=0.75)
            if near:
                msg += f" (did you mean {near[0]!r}?)"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        # Union types add the member's name to the path; drop those parts.
        clean = tuple(p for p in loc if isinstance(p, int) or not p[:1].isupper() and p not in ("int", "float"))
        more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
        raise InputError(msg + more, file=path, line=_line_of(_nodes(text), clean), field=_loc_str(clean)) from None
    spec.path = path
    spec.text = text
    _resolve_paths(spec, path.parent)
    if check_files:
        _check_files(spec, path, text)
    return spec


def _without_top_level(text: str, key: str) -> str | None:
    """``text`` without the block of top-level ``key`` (its line and the indented, blank, comment and
    ``- `` lines after it); None unless exactly one line starts with ``key:``."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.startswith(key) and line[len(key):].lstrip(" ")[:1] == ":"]
    if len(starts) != 1:
        return None
    i = j = starts[0]
    j += 1
    while j < len(lines) and (lines[j][:1] in (" ", "\t", "#", "-") or not lines[j].strip()):
        j += 1
    return "".join(lines[:i] + lines[j:])


def stored_stages(text: str, path: Path) -> tuple[list[Stage], TargetModel | None]:
    """The resolved stages and the target model of a plan's stored spec, without reading its candidates.

    ``rbridge status`` needs only these (the candidates are rows of the store), and the
    candidates are nearly all of a large spec: 5,000 of them take most of a second to
    parse. A stored spec was validated when its plan began, so its top-level keys sit
    at column 0 and the ``candidates:`` block can be cut out of the text; the rest is
    validated as a spec with one stand-in candidate. Anything unexpected (a flow-style
    block that does not cut cleanly, say) parses the whole spec instead, with the same
    answer and the same errors as :func:`parse_spec`.
    """
    rest = _without_top_level(text, "candidates")
    try:
        data = _load_yaml(rest) if rest is not None else None
        if isinstance(data, dict) and "candidates" not in data and isinstance(data.get("sources"), dict) \
                and data["sources"]:
            stand_in = {"name": "stand-in", "mix": {next(iter(data["sources"])): 1.0}}
            spec = Spec.model_validate({**data, "candidates": [stand_in]})
            return spec.resolved_stages(), spec.target_model
    except (yaml.YAMLError, ValidationError, FieldError, InputError, ValueError, TypeError):
        pass
    spec = parse_spec(text, path, check_files=False)
    return spec.resolved_stages(), spec.target_model


def load_spec(path: str | Path, check_files: bool = True) -> Spec:
    """Read, validate and resolve the spec at ``path``; raises InputError on any problem."""
    path = Path(path)
    if not path.is_file():
        raise InputError("spec file not found", file=path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read spec: {exc}", file=path) from None
    return parse_spec(text, path, check_files=check_files)
