"""Typed run configuration: YAML file + dotted ``key=value`` overrides, validated up front.

Kept free of torch imports so that a bad command line fails in a fraction of a second.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from braid.config_rules import CHOICES, RANGES, Choice, Range
from braid.config_yaml import BOOL_WORDS, load_yaml_file, parse_value
from braid.errors import ConfigError
from braid.models.hybrid_pattern import is_megatron, translate
from braid.models.presets import load_preset, preset_names
from braid.models.registry import (
    ffn_letters,
    freeze_options,
    mixer_declaration,
    mixer_letters,
    option_sections,
    section_layers,
)


@dataclass
class RunConfig:
    name: str = "braid"
    dir: Optional[str] = None  # default: runs/<name>


@dataclass
class HyperConnectionConfig:
    """Hyper-connections (model.connection=hc): n residual streams mixed by learned matrices."""

    rate: int = 4
    dynamic: bool = False
    sinkhorn_iters: int = 0  # > 0: mHC, residual mixing projected to doubly stochastic


@dataclass
class S2Config:
    """S2 strided block-sparse attention pattern (Lin et al.) for the attention mixers (A, G, F); refused
    with M or H layers, whose attention does not apply it."""

    enabled: bool = False
    block: int = 64  # block size in tokens
    local_blocks: int = 32  # recent blocks every head sees
    vert_stride: int = 8  # every vert_stride-th older block, offset per head


@dataclass
class _ModelKeys:
    """The keys of every model; ModelConfig adds a section per registered mixer/FFN options class."""

    preset: Optional[str] = None
    # One letter per layer; letters are resolved through braid.models.registry. A pattern with Megatron's
    # * - E | letters is translated to pattern + ffn_pattern + stage_layers (braid/models/hybrid_pattern.py).
    pattern: str = "AAAA"
    # FFN letter per layer (same length as pattern) or a single letter used for every layer.
    ffn_pattern: str = "S"
    # First layer of every pipeline stage after the first (a Megatron-style pattern's '|'); [] = one stage.
    # Recorded for pipeline parallelism: a single-stage run ignores it.
    stage_layers: List[int] = field(default_factory=list)
    d_model: int = 256
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # default: n_heads (no GQA)
    head_dim: Optional[int] = None  # default: d_model // n_heads
    ffn_hidden: Optional[int] = None  # default: 8/3 d_model rounded up to ffn_multiple
    ffn_multiple: int = 64
    vocab_size: Optional[int] = None  # default: tokenizer vocabulary padded to vocab_multiple
    vocab_multiple: int = 64
    pos_emb: str = "rope"  # rope | none
    rope_theta: float = 10000.0
    # Fraction of each head's channels RoPE rotates, the first ones (Megatron's --rotary-percent; GPT-NeoX
    # and Qwen3-Next 0.25); the rest carry no position. A, G, F and H layers (MLA has its own rope dims).
    rotary_percent: float = 1.0
    qk_norm: bool = False
    window: Optional[int] = None  # sliding window (keys within the last `window` positions)
    global_layers: List[int] = field(default_factory=list)  # layers that ignore `window`
    attn_gate: str = "headwise"  # gated attention (letter G): headwise | elementwise
    meta_tokens: int = 0  # learned tokens prepended to every sequence, visible to all (Hymba)
    connection: str = "residual"  # residual | hc | ngpt (normalized Transformer, braid/models/ngpt.py)
    norm_eps: float = 1e-5
    # Residual-stream, final and q/k RMSNorms scale by 1 + w with w starting at 0 (Megatron's
    # --apply-layernorm-1p / layernorm_zero_centered_gamma; Qwen3-Next).
    norm_zero_centered: bool = False
    tie_embeddings: bool = False
    init_std: float = 0.02


# model.<section> of every registered mixer/FFN (declared in its module: braid/models/registry.py), then the
# sections no single mixer owns.
_SECTIONS = {**freeze_options(), "hc": HyperConnectionConfig, "s2": S2Config}
ModelConfig = dataclasses.make_dataclass(
    "ModelConfig", [(name, cls, field(default_factory=cls)) for name, cls in _SECTIONS.items()], bases=(_ModelKeys,))
ModelConfig.__module__ = __name__
ModelConfig.__doc__ = "The model section: " + (_ModelKeys.__doc__ or "")


def __getattr__(name: str) -> type:
    # The options classes by name (``from braid.config import KDAConfig``), wherever they are declared.
    for cls in _SECTIONS.values():
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class DataConfig:
    source: str = "embedded"  # embedded | local file/dir | Hugging Face dataset name
    tokenizer: str = "bytes"  # bytes | local tokenizer path
    seq_len: int = 256
    text_field: str = "text"
    hf_split: str = "train"
    valid_fraction: float = 0.01  # documents held out for evaluation
    reset_position_ids: bool = False  # positions restart at every document
    document_mask: bool = True  # attention never crosses a document boundary
    cache_dir: str = ""  # indexed sources: megatron-core's cached sample indices ("" = cache/ next to the data)
    streaming: bool = False  # read data.source (one name/file or a "w1 srcA w2 srcB" blend) as a HF stream
    stream_lanes: int = 8  # streaming: independent packing lanes (dp-invariant); must divide global batch


@dataclass
class TrainConfig:
    steps: int = 200
    micro_batch_size: int = 8
    global_batch_size: int = 8
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # wsd: final fraction of steps spent decaying
    weight_decay: float = 0.1
    # adamw | muon: Muon (Newton–Schulz orthogonalised momentum) for the blocks' weight matrices, AdamW
    # (beta1, beta2, eps) for embeddings, head, norms, biases, router and other vectors; same lr.
    optimizer: str = "adamw"
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5
    muon_lr_scale: str = "match_rms_adamw"  # match_rms_adamw (0.2·sqrt(max(m, n))) | original (sqrt(max(1, m/n)))
    # Kimi K2's QK-clip: after each step, heads whose largest attention logit exceeded this have their
    # W_q / W_k rows scaled down to bring it back to the threshold. 0 = off.
    qk_clip: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 1234
    eval_interval: int = 50
    eval_iters: int = 4  # global batches of the held-out split per evaluation (the same data at any dp)
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    threads: Optional[int] = None  # CPU intra-op threads
    # Operations: non-finite steps are skipped and counted; this many in a row
    # stop the run (exit code 3) with its last good checkpoint intact. 0 = never stop.
    max_nan_iterations: int = 10
    loss_spike_window: int = 100  # trailing iterations for the loss-spike z-score; 0 = no detector
    loss_spike_zscore: float = 5.0  # warn when the loss is this many standard deviations above that mean
    timing_sync: bool = False  # CUDA: synchronize around each timed phase (exact breakdown, slower steps)
    profile_steps: List[int] = field(default_factory=list)  # [first, last] iterations traced by torch.profiler
    memory_snapshot_step: int = 0  # CUDA: dump a memory snapshot after this iteration; 0 = none
    debug_nan_steps: List[int] = field(default_factory=list)  # testing: iterations whose loss is made NaN


@dataclass
class CheckpointConfig:
    interval: int = 100
    keep: int = 2
    resume: str = "auto"  # auto | none | path to a checkpoint dir
    # After the last step (not on a signal stop) rank 0 writes the final checkpoint as a Hugging Face
    # directory, as `python -m braid.convert to-hf` would: false | true (<run.dir>/hf) | a path.
    export_hf: Any = False
    # A NEW run (step 0, fresh optimizer and schedule) starts from these weights: a braid checkpoint
    # (step_N, latest, checkpoints/ or a run dir) or a HF dir braid.convert.load supports. Ignored when
    # the run resumes its own checkpoint (resume=auto finding one, or resume=<path>).
    init_from: Optional[str] = None
    # Before loading, compare every file of the checkpoint with the checksum its COMPLETE manifest
    # recorded (reads every byte; a mismatch is damage: resume=auto sets it aside). false skips this
    # for who must (a trusted, very large checkpoint on slow storage); sizes are still checked.
    verify: bool = True


@dataclass
class LoggingConfig:
    interval: int = 10
    wandb: str = "off"  # off | offline | online
    wandb_project: str = "braid"
    wandb_entity: Optional[str] = None


@dataclass
class ParallelConfig:
    """Parallel layout. pp × dp_replicate × dp_shard × cp × tp = world size; ep divides dp_shard × cp."""

    dp: Optional[int] = None  # data-parallel size (alias of dp_shard when the others are 1); default: world
    dp_replicate: int = 1  # HSDP replicas (FSDP2 shards within a replica)
    dp_shard: Optional[int] = None  # FSDP2 shard size; default: world / (dp_replicate × cp × tp)
    tp: int = 1  # tensor parallel (DTensor plans per mixer)
    pp: int = 1  # pipeline stages ranks (outermost mesh dim; stage split: `|` in model.pattern, else balanced)
    pp_schedule: str = "1f1b"  # 1f1b | interleaved_1f1b | zbv (zero-bubble V) | gpipe
    pp_virtual_stages: int = 0  # stages per pipeline rank; 0 = the schedule's (2 for interleaved_1f1b and zbv, else 1)
    cp: int = 1  # context parallel
    cp_kind: str = "ring"  # ring | s2 (needs model.s2.enabled) | tree | ulysses
    cp_layout: str = "auto"  # auto (zigzag unless no mixer calls attention: its cp_ops) | zigzag | contiguous
    ep: int = 1  # expert parallel (experts sharded over ep ranks of dp_shard × cp)
    engine: str = "fsdp"  # fsdp (torch FSDP2 / DDP) | deepspeed
    zero_stage: int = 1  # deepspeed ZeRO stage 1 | 2 | 3
    cpu_offload: bool = False  # deepspeed optimizer/parameter offload to CPU
    activation_checkpoint: str = "none"  # none | full | every_<N> (every N-th block)
    compile: bool = False  # per-block torch.compile (GPU)
    sequence_parallel: bool = True  # with tp > 1: shard norms/residuals along the sequence
    layout: str = "manual"  # manual (the keys above) | auto (braid.plan's best fitting layout for the world size)
    plan_gpu: str = "auto"  # GPU kind layout=auto plans for: auto (the CUDA device; h100-sxm without one) or a kind


@dataclass
class KernelsConfig:
    """Triton kernels (GPU)."""

    # Before a Triton kernel serves a new call signature, compare it once with torch on a small
    # random case; a mismatch or launch failure sends that op to torch (braid/kernels/self_check.py).
    self_check: bool = True


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) if self.run.dir else Path("runs") / self.run.name


_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def leaf_fields(schema: Any = None, where: str = "") -> dict[str, Any]:
    """Every value key of the config (``section.key`` -> its type hint), sections walked recursively."""
    out: dict[str, Any] = {}
    for name, hint in typing.get_type_hints(schema or Config).items():
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(hint):
            out.update(leaf_fields(hint, key))
        else:
            out[key] = hint
    return out


def _check_keys(tree: Any, schema: Any, where: str) -> None:
    """Reject unknown keys with the list of allowed ones (OmegaConf's message is multi-line)."""
    if not isinstance(tree, dict):
        return
    allowed = typing.get_type_hints(schema)
    for key, value in tree.items():
        name = f"{where}.{key}" if where else str(key)
        if key not in allowed:
            raise ConfigError(f"unknown config key '{name}' (allowed: {', '.join(allowed)})")
        sub = allowed[key]
        if dataclasses.is_dataclass(sub):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{name}' is a section, not a value")
            _check_keys(value, sub, name)


def _parse_overrides(overrides: list[str]) -> dict:
    from omegaconf import OmegaConf  # imported here: the GPU image lacks it, and only loading needs it
    from omegaconf.errors import OmegaConfBaseException

    tree = OmegaConf.create({})
    for item in overrides:
        key, eq, text = item.partition("=")
        if not eq:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        if not _KEY_RE.match(key):
            raise ConfigError(f"override '{item}': '{key}' is not a dotted section.key name")
        try:
            # Megatron's * and | are YAML syntax: such a pattern is taken as written, unquoted.
            raw = key == "model.pattern" and is_megatron(text) and text[:1] not in ("'", '"')
            OmegaConf.update(tree, key, text if raw else parse_value(item, text), merge=True)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"override '{item}' could not be applied: {_first_line(exc)}") from None
    return OmegaConf.to_container(tree)


def _load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    loaded = load_yaml_file(path)
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections")
    return loaded


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build the config: dataclass defaults ← model preset ← YAML file ← overrides.

    The preset named by ``model.preset`` (command line first, then file) supplies the whole model
    section; other ``model.*`` keys in the file or overrides adjust it.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    file_tree = _load_yaml(path) if path is not None else {}
    cli_tree = _parse_overrides(overrides or [])
    _check_keys(file_tree, Config, "")
    _check_keys(cli_tree, Config, "")

    preset = cli_tree.get("model", {}).get("preset", file_tree.get("model", {}).get("preset"))
    layers = [OmegaConf.structured(Config)]
    if preset is not None:
        if not isinstance(preset, str) or preset not in preset_names():
            raise ConfigError(f"model.preset '{preset}' is unknown (allowed: {', '.join(preset_names())})")
        preset_tree = load_preset(preset)
        _check_keys(preset_tree, ModelConfig, f"preset '{preset}'")
        layers.append(OmegaConf.create({"model": preset_tree}))
    layers += [OmegaConf.create(file_tree), OmegaConf.create(cli_tree)]
    try:
        merged = OmegaConf.merge(*layers)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(f"config key '{key}': {_first_line(exc)}") from None
    cfg: Config = OmegaConf.to_object(merged)
    cfg.model.preset = preset
    _translate_pattern(cfg.model)
    export = cfg.checkpoint.export_hf  # untyped (a bool or a path): the words a bool key takes mean bools
    if isinstance(export, str) and export.lower() in BOOL_WORDS:
        cfg.checkpoint.export_hf = BOOL_WORDS[export.lower()]
    validate(cfg)
    return cfg


def _translate_pattern(m: ModelConfig) -> None:
    if not is_megatron(m.pattern):
        return
    if m.stage_layers:
        raise ConfigError(f"config key 'model.stage_layers' = {m.stage_layers!r} cannot be set together with a "
                          f"Megatron-style model.pattern {m.pattern!r}, whose '|' give the stages")
    m.pattern, m.ffn_pattern, m.stage_layers = translate(m.pattern, m.ffn_pattern, mixer_letters())


def _require(ok: bool, key: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' = {value!r} is invalid: {allowed}")


def _check_tables(section: Any, where: str) -> None:
    """The RANGES and (closed) CHOICES of every key under ``where`` ("" = the whole config)."""
    hints = leaf_fields(type(section), where)
    prefix = f"{where}." if where else ""
    for key, rule in [*RANGES.items(), *CHOICES.items()]:
        if not key.startswith(prefix) or (isinstance(rule, Choice) and rule.other):
            continue
        value = section
        for part in key[len(prefix):].split("."):
            value = getattr(value, part)
        if value is None:  # the type allowed it: an Optional key
            continue
        ok = rule.allows(value) if isinstance(rule, Range) else value in rule.values
        allowed = ("null or " if type(None) in typing.get_args(hints[key]) else "") + str(rule)
        _require(ok, key, f"must be {allowed}" if isinstance(rule, Range) else allowed, value)


def virtual_stages(p: "ParallelConfig") -> int:
    """Pipeline stages per pp rank: ``parallel.pp_virtual_stages``, or the schedule's when it is 0."""
    return p.pp_virtual_stages or (2 if p.pp_schedule in ("interleaved_1f1b", "zbv") else 1)


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express; each failure names its key."""
    # Single-key ranges first: the checks below divide by sizes.
    _check_tables(cfg, "")
    m, d, t, c, p = cfg.model, cfg.data, cfg.train, cfg.checkpoint, cfg.parallel
    _require(bool(re.fullmatch(r"[A-Za-z0-9_.\-]+", cfg.run.name)), "run.name",
             "letters, digits, '.', '_' or '-' only", cfg.run.name)
    _require(len(m.pattern) > 0 and all(ch in mixer_letters() for ch in m.pattern), "model.pattern",
             f"a non-empty string of mixer letters {''.join(sorted(mixer_letters()))}", m.pattern)
    _require(len(m.ffn_pattern) in (1, len(m.pattern)) and all(ch in ffn_letters() for ch in m.ffn_pattern),
             "model.ffn_pattern",
             f"one FFN letter of {''.join(sorted(ffn_letters()))} or one per layer of model.pattern",
             m.ffn_pattern)
    _require(m.d_model % m.n_heads == 0 or m.head_dim is not None, "model.n_heads",
             f"must divide model.d_model={m.d_model} unless model.head_dim is set", m.n_heads)
    kv = m.n_kv_heads if m.n_kv_heads is not None else m.n_heads
    _require(m.n_heads % kv == 0, "model.n_kv_heads", f"must divide model.n_heads={m.n_heads}", m.n_kv_heads)
    hd = m.head_dim if m.head_dim is not None else m.d_model // m.n_heads
    _require(hd > 0 and hd % 2 == 0, "model.head_dim",
             f"model.d_model // model.n_heads = {hd} must be a positive even number (or set model.head_dim)", hd)
    _require(m.rotary_percent == 1.0 or int(hd * m.rotary_percent) >= 2, "model.rotary_percent",
             f"must leave at least 2 of head_dim={hd} channels to rotate", m.rotary_percent)
    _require(m.rotary_percent == 1.0 or "M" not in m.pattern, "model.rotary_percent",
             "1.0 on a pattern with M layers (MLA rotates its own model.mla.qk_rope_head_dim channels)",
             m.rotary_percent)
    _require(not (m.norm_zero_centered and m.connection == "ngpt"), "model.norm_zero_centered",
             "false with model.connection=ngpt (its connections and final norm are not RMSNorms)",
             m.norm_zero_centered)

    _require(bool(d.source), "data.source", str(CHOICES["data.source"]), d.source)
    _require(d.tokenizer in CHOICES["data.tokenizer"].values or Path(d.tokenizer).exists(), "data.tokenizer",
             str(CHOICES["data.tokenizer"]), d.tokenizer)

    _require(t.profile_steps == [] or (len(t.profile_steps) == 2 and 1 <= t.profile_steps[0] <= t.profile_steps[1]),
             "train.profile_steps", "[] or [first, last] iterations with 1 <= first <= last", t.profile_steps)
    _require(all(s >= 1 for s in t.debug_nan_steps), "train.debug_nan_steps", "iterations >= 1",
             t.debug_nan_steps)
    dp = p.dp or 1
    _require(t.global_batch_size % (t.micro_batch_size * dp) == 0, "train.global_batch_size",
             f"must be a multiple of train.micro_batch_size × parallel.dp = {t.micro_batch_size * dp}",
             t.global_batch_size)

    _require(c.resume in CHOICES["checkpoint.resume"].values or Path(c.resume).is_dir(), "checkpoint.resume",
             str(CHOICES["checkpoint.resume"]), c.resume)
    _require(isinstance(c.export_hf, bool) or (isinstance(c.export_hf, str) and c.export_hf.strip() != ""),
             "checkpoint.export_hf", str(CHOICES["checkpoint.export_hf"]), c.export_hf)
    _require(not (c.export_hf is not False and p.engine == "deepspeed"), "checkpoint.export_hf",
             "not with parallel.engine=deepspeed (ZeRO partitions are not DCP checkpoints)", c.export_hf)
    _require(c.init_from is None or Path(c.init_from).exists(), "checkpoint.init_from",
             "null or an existing braid checkpoint / Hugging Face directory", c.init_from)
    _require(p.activation_checkpoint in CHOICES["parallel.activation_checkpoint"].values
             or bool(re.fullmatch(r"every_[1-9][0-9]*", p.activation_checkpoint)),
             "parallel.activation_checkpoint", str(CHOICES["parallel.activation_checkpoint"]),
             p.activation_checkpoint)
    _require(t.optimizer != "muon" or p.engine == "fsdp", "train.optimizer",
             "muon needs parallel.engine=fsdp (ZeRO flattens the matrices Newton–Schulz works on)", t.optimizer)
    _require(p.pp >= 1, "parallel.pp", "a positive number of pipeline ranks", p.pp)
    _require(p.pp == 1 or p.engine == "fsdp", "parallel.pp",
             "pipeline parallelism runs under parallel.engine=fsdp (DeepSpeed's pipeline engine is not used)", p.pp)
    _require(p.pp == 1 or not m.tie_embeddings, "model.tie_embeddings",
             "false with parallel.pp > 1 (the embedding and the head live on different stages)", m.tie_embeddings)
    virtual = virtual_stages(p)
    _require(virtual == {"gpipe": 1, "1f1b": 1, "zbv": 2}.get(p.pp_schedule, virtual)
             and virtual >= (2 if p.pp_schedule == "interleaved_1f1b" else 1),
             "parallel.pp_virtual_stages", f"1 for gpipe and 1f1b, 2 for zbv, >= 2 for interleaved_1f1b "
             f"(parallel.pp_schedule = {p.pp_schedule})", p.pp_virtual_stages)
    _require(p.pp * virtual <= len(m.pattern), "parallel.pp",
             f"pipeline stages (pp × pp_virtual_stages = {p.pp * virtual}) at most the "
             f"{len(m.pattern)} layers", p.pp)
    _require(not m.stage_layers or p.pp == 1 or len(m.stage_layers) + 1 == p.pp * virtual,
             "model.pattern", f"{len(m.stage_layers) + 1} stages marked with '|' but parallel.pp × "
             f"pp_virtual_stages = {p.pp * virtual}", m.pattern)
    _require(t.qk_clip == 0 or (p.engine == "fsdp" and (p.tp or 1) == 1 and (p.cp or 1) == 1), "train.qk_clip",
             "QK-clip runs under parallel.engine=fsdp without tensor or context parallelism (tp = cp = 1)",
             t.qk_clip)
    if m.connection == "ngpt":
        ffns = set(m.ffn_pattern)
        _require(ffns <= {"S", "-"} and m.meta_tokens == 0 and p.engine == "fsdp" and (p.tp or 1) == 1,
                 "model.connection", "ngpt takes SwiGLU or no FFNs (S, -), no meta tokens, parallel.engine=fsdp "
                 "and tp = 1 (its weight normalisation covers neither stacked experts nor ZeRO's flat "
                 "partitions; the vocab-parallel head has no logit scales)", m.connection)
    _require(p.cp_kind != "s2" or m.s2.enabled, "parallel.cp_kind",
             "s2 needs model.s2.enabled=true (without the S2 pattern it would run ring attention)", p.cp_kind)
    _validate_mixers(m)


def _validate_mixers(m: ModelConfig) -> None:
    """Checks of the per-mixer sections that involve other keys; only the sections a pattern uses can fail."""
    n_layers = len(m.pattern)
    for i in m.global_layers:
        _require(0 <= i < n_layers, "model.global_layers", f"layer indices in [0, {n_layers})", m.global_layers)
    _require(list(m.stage_layers) == sorted(set(m.stage_layers)) and all(0 < i < n_layers for i in m.stage_layers),
             "model.stage_layers", f"ascending layer indices in [1, {n_layers})", m.stage_layers)
    if m.s2.enabled:
        # S2 applies to the mixers that declare it; other softmax attention would silently stay dense.
        s2 = [ch for ch in mixer_letters() if mixer_declaration(ch, "s2_capable")]
        dense = sorted(ch for ch in set(m.pattern) if not mixer_declaration(ch, "s2_capable")
                       and "attention" in mixer_declaration(ch, "cp_ops"))
        _require(not dense and any(ch in s2 for ch in m.pattern), "model.s2.enabled",
                 f"S2 applies to the attention mixers {', '.join(s2)} only, and model.pattern "
                 f"{m.pattern!r} " + (f"has {'/'.join(dense)} layers, whose attention would stay dense"
                                      if dense else "has none"), m.s2.enabled)
    for name in option_sections():
        layers = section_layers(name, m.pattern, m.ffn_pattern)
        check = getattr(getattr(m, name), "check", None)
        if layers and check is not None:
            check(m, layers, _require)


def validate_moe(e: Any) -> None:
    """The ``model.moe`` checks: run by :func:`validate` and by the MoE layer itself, which tests and
    tools also build from a bare ``ModelConfig``."""
    _check_tables(e, "model.moe")
    e.check(None, [], _require)


def to_yaml(cfg: Config) -> str:
    try:
        from omegaconf import OmegaConf
    except ImportError:  # the GPU image: plain PyYAML writes the same mapping (it loads back the same)
        import yaml

        return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
