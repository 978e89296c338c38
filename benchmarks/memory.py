"""Benchmark: per-device memory of the pre-training step from XLA's compiled memory analysis (AOT, nothing runs).

  .venv/bin/python -m benchmarks.memory [--config configs/pretrain.py:base] [--mesh data=32]
      [--batch-per-device 2,4] [--verify 32] [--remat on,off] [--dtype bf16,f32] [--microbatches 1,4]
      [--attention batched,per_clip] [--capacity-gib 16,32,80] [--global-batch 1024] [--dump DIR] [--fast] [--json]

The step is the one `clover_jax.train` runs: `run.setup_run` (mesh, model config, parameter shardings),
`optim.make_optimizer`, the task's loss (or, with `config.microbatches > 1`, the gradient-caching
value-and-grad) and `train_step.make_train_step`. It is lowered from `jax.ShapeDtypeStruct`s carrying
their shardings and compiled for `--mesh` on virtual CPU devices (XLA_FLAGS=
--xla_force_host_platform_device_count is set before jax is imported): no parameter, optimizer state or
batch is ever allocated. For every combination of the flags it prints, per device, XLA's arguments,
outputs, aliased bytes (the donated state), temporaries and the peak = arguments + outputs - aliased +
temporaries (what must be resident at once), and the compile time.

Memory is close to affine in the per-device batch b, peak(b) = fixed + slope * b (not exactly: the
compiler's schedule, hence the peak's position, can change with b). Each combination is compiled at
two batches (`--batch-per-device`), the line is fitted through them, checked against one more compile
(`--verify`), and read at the paper's global batch split over the mesh's batch axes (`--global-batch`) and
for the largest batch that fits each `--capacity-gib`. With `--microbatches k` every batch is multiplied by
k, so a chunk keeps the given rows per device.

Figures are the CPU compiler's buffer assignment (its fusion and schedule); a GPU/TPU compile of the same
step can differ by its fusion and scheduling decisions. `--dump DIR` writes XLA's dumps and prints, for the
first compile, the values live at its peak (`*live-range.txt`), attributed to the model's modules and to
forward / rematerialised / backward by their op_name. `--fast` stops each compile (in a child process) once
XLA has written the buffer assignment, before LLVM code generation, which does not change the sizes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

GIB = 2**30


def parse_mesh(text: str) -> dict[str, int]:
    """'data=8,fsdp=4' -> {'data': 8, 'fsdp': 4, 'model': 1} (the config's axis order)."""
    axes = {"data": 1, "fsdp": 1, "model": 1}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, size = part.partition("=")
        if name not in axes or not size.isdigit() or int(size) < 1:
            raise SystemExit(f"--mesh: bad entry {part!r}; use e.g. data=8,fsdp=4 (axes data, fsdp, model)")
        axes[name] = int(size)
    return axes


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


@dataclasses.dataclass
class Setting:
    remat: bool
    dtype: str
    microbatches: int
    attention: str


@dataclasses.dataclass
class Measurement:
    setting: Setting
    batch_per_device: int
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    compile_s: float

    @property
    def peak(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries


# ---- building and compiling the step -------------------------------------------------------------


def load_config(spec: str, mesh_axes: dict[str, int], setting: Setting, global_batch: int) -> Any:
    """The run config of `spec` with the mesh, batch, remat, dtype, microbatches and attention applied.
    `setting.attention` is a video batching ("batched", "per_clip"), a window-attention kernel name
    (`kernels.ops.WINDOW_ATTENTION`) or "-" (the config's own)."""
    from clover_jax import run_setup
    from clover_jax.models.clover import VIDEO_BATCHING

    config = run_setup.load_config_file(spec)
    config.compilation_cache_dir = ""
    config.mesh = dict(mesh_axes)
    config.data.batch_size = global_batch
    config.eval.batch_size = global_batch
    config.model.remat = "full" if setting.remat else "none"
    config.model.dtype = {"bf16": "bfloat16", "f32": "float32"}[setting.dtype]
    if setting.microbatches != 1:
        config.microbatches = setting.microbatches
    if setting.attention in VIDEO_BATCHING:
        config.model.video_batching = setting.attention
    elif setting.attention != "-":
        config.kernels.window_attention = setting.attention
    # The accelerators' layout: auto clip groups split the batch only on a single CPU device, a schedule
    # choice of XLA:CPU that would otherwise enter this CPU compile of an accelerator step.
    config.kernels.clip_groups = 1
    return config


def compile_step(config: Any) -> tuple[Any, float, dict[str, Any]]:
    """(compiled step, lower+compile seconds, facts) for `config`, lowered from abstract arrays only."""
    import flax.linen as nn
    import jax

    from clover_jax import aot

    compiled, run, seconds = aot.compile_train_step(config)
    model = run.model_config
    facts = dict(
        params=sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(run.abstract_params))),
        attention=f"{model.video_batching}, {run.execution.window_attention}",
        frames=model.num_frames, image_size=model.image_size, text_length=config.data.text_length,
    )
    return compiled, seconds, facts


def measure(spec: str, mesh_axes: dict[str, int], replicas: int, setting: Setting, per_device: int
            ) -> tuple[Measurement, dict[str, Any]]:
    config = load_config(spec, mesh_axes, setting, per_device * setting.microbatches * replicas)
    compiled, seconds, facts = compile_step(config)
    return compiled_measurement(compiled, setting, per_device * setting.microbatches, seconds), facts


def compiled_measurement(compiled: Any, setting: Setting, batch_per_device: int, compile_s: float) -> Measurement:
    """The per-device sizes of `compiled.memory_analysis()` as a Measurement."""
    m = compiled.memory_analysis()
    return Measurement(setting, batch_per_device, int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
                       int(m.alias_size_in_bytes), int(m.temp_size_in_bytes), compile_s)


def measure_from_dump(spec: str, mesh_axes: dict[str, int], replicas: int, setting: Setting, per_device: int,
                      dump: pathlib.Path) -> dict[str, Any]:
    """Compiles in a thread and returns the sizes as soon as XLA has written the step's buffer assignment
    (before LLVM code generation, which takes as long again on CPU and does not change the sizes)."""
    import threading

    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["measurement"], box["facts"] = measure(spec, mesh_axes, replicas, setting, per_device)
        except BaseException as err:  # noqa: BLE001  (reported by the caller)
            box["error"] = err

    start = time.perf_counter()
    threading.Thread(target=work, daemon=True).start()
    while True:
        time.sleep(2)
        if "error" in box:
            raise box["error"]
        if "measurement" in box:
            m = box["measurement"]
            return dict(arguments=m.arguments, outputs=m.outputs, aliased=m.aliased, temporaries=m.temporaries,
                        compile_s=m.compile_s, source="memory_analysis", **box["facts"])
        reports = sorted(dump.glob("*jit_step*after_optimizations-memory-usage-report.txt"))
        assignments = [r.with_name(r.name.replace("-memory-usage-report.txt", "-buffer-assignment.txt"))
                       for r in reports]
        if assignments and assignments[0].exists():
            time.sleep(2)  # let the writer finish
            kinds = allocation_summary(assignments[0].read_text())
            return dict(arguments=kinds.get("parameter", 0), outputs=kinds.get("output", 0), aliased=0,
                        temporaries=kinds.get("preallocated-temp", 0), compile_s=time.perf_counter() - start,
                        source="buffer-assignment dump (compile stopped before code generation)")


def feature_available(spec: str, setting: Setting) -> str:
    """'' when the code base supports the setting, else the reason it cannot be compiled yet."""
    from clover_jax import run_setup

    config = run_setup.load_config_file(spec)
    if setting.microbatches != 1 and "microbatches" not in config:
        return "config.microbatches is not available in this checkout"
    if setting.attention != "-" and "kernels" not in config:
        return "config.kernels is not available in this checkout"
    return ""


# ---- the peak's buffers, from XLA's live-range dump -----------------------------------------------


def _tree_nodes(text: str) -> list[tuple[int, str, float, int]]:
    """(depth, name, percent, total bytes) of the 'Stack trace breakdown for peak usage' tree."""
    nodes = []
    for line in text.splitlines():
        m = re.match(r"^(.*?)(?:[├└]── )?(\S+) \(([0-9.]+)%, total: ([0-9 ]+) bytes", line)
        if m:
            nodes.append((len(m.group(1)) // 4, m.group(2), float(m.group(3)), int(m.group(4).replace(" ", ""))))
    return nodes


_CATEGORIES = [
    ("optimizer state (mu, nu)", r"^state\.opt_state"),
    ("parameters", r"^state\.params"),
    ("batch (inputs)", r"^batch\."),
    ("Swin stage 1", r"video_encoder/layers_0/"),
    ("Swin stage 2", r"video_encoder/layers_1/"),
    ("Swin stage 3", r"video_encoder/layers_2/"),
    ("Swin stage 4", r"video_encoder/layers_3/"),
    ("Swin patch embed / mask", r"video_encoder"),
    ("text encoder", r"text_encoder"),
    ("fusion", r"fusion"),
    ("MLM head (vocab logits)", r"mlm_head"),
    ("loss", r"focal|log_softmax|pretrain_objective|nce"),
    ("optimizer update / grad norm", r"adam|optax|clip|global_norm|scale_by|apply_updates|sqrt"),
]


def _category(name: str, op_name: str) -> str:
    """Where a live value comes from: state, batch, or the model module (+ backward) its op_name names."""
    for label, pattern in _CATEGORIES[:3]:
        if re.search(pattern, op_name):
            return label
    phase = (" (remat: forward recomputed in the backward)" if "rematted_computation" in op_name
             else " (backward)" if "transpose(" in op_name else " (forward, kept for the backward)")
    for label, pattern in _CATEGORIES[3:]:
        if re.search(pattern, op_name):
            return label + phase
    return "other: " + (op_name.split("/")[-1] if op_name else re.sub(r"[.\d]+$", "", name))


def hlo_instructions(hlo: str) -> dict[str, tuple[str, str]]:
    """HLO instruction name -> (shape, op_name); a fusion without metadata takes the op_name of its fused
    computation's root (or of the first instruction there that has one)."""
    computation_op: dict[str, str] = {}
    current, root_op, first_op = "", "", ""
    raw: dict[str, tuple[str, str, str]] = {}
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head and not line.startswith(" "):
            current, root_op, first_op = head.group(1), "", ""
            continue
        if line.startswith("}"):
            computation_op[current] = root_op or first_op
            continue
        m = re.match(r"^\s*(ROOT )?%?([\w.\-]+) = (\S+) (.*)$", line)
        if not m:
            continue
        op = re.search(r'op_name="([^"]*)"', m.group(4))
        op_name = op.group(1) if op else ""
        if op_name:
            first_op = first_op or op_name
            if m.group(1):
                root_op = op_name
        calls = re.search(r"calls=%?([\w.\-]+)", m.group(4))
        operands = re.findall(r"%([\w.\-]+)", m.group(4).split("),", 1)[0])
        raw.setdefault(m.group(2), (m.group(3), op_name or computation_op.get(calls.group(1) if calls else "", ""),
                                    operands))

    def resolve(name: str, depth: int = 0) -> str:
        """op_name of `name`, else of its first operand that has one (converts and copies carry none)."""
        _, op_name, operands = raw.get(name, ("", "", []))
        if op_name or depth > 4:
            return op_name
        return next((o for o in (resolve(x, depth + 1) for x in operands) if o), "")

    return {name: (shape, resolve(name)) for name, (shape, _, _) in raw.items()}


def allocation_summary(assignment: str) -> dict[str, int]:
    """Bytes per allocation kind (parameter, preallocated-temp, output, constant, ...) of a buffer-assignment
    dump; parameters and preallocated-temp match memory_analysis()'s arguments and temporaries."""
    kinds: dict[str, int] = {}
    for m in re.finditer(r"^allocation \d+: size (\d+), (.*)$", assignment, flags=re.M):
        rest = m.group(2)
        kind = ("parameter" if rest.startswith("parameter") else "preallocated-temp" if "preallocated-temp" in rest
                else "output" if rest.startswith("output") else "constant" if rest.startswith("constant")
                else rest.split(",")[0].split(":")[0].strip())
        kinds[kind] = kinds.get(kind, 0) + int(m.group(1))
    return kinds


def peak_buffers(dump_dir: pathlib.Path, top: int = 12, min_percent: float = 2.0, max_depth: int = 7) -> list[str]:
    """The largest values live at the peak of the first jit_step module, with shape and op_name, and the
    peak broken down by the op_name path (XLA's `*live-range.txt`, 'Stack trace breakdown')."""
    files = sorted(dump_dir.glob("*jit_step*after_optimizations-live-range.txt"))
    if not files:
        return [f"no *jit_step*after_optimizations-live-range.txt under {dump_dir}"]
    live = files[0]
    text = live.read_text()
    hlo_file = live.with_name(live.name.replace("-live-range.txt", ".txt"))
    hlo = hlo_file.read_text() if hlo_file.exists() else ""
    lines = [f"dump: {live.name}"]
    assignment = live.with_name(live.name.replace("-live-range.txt", "-buffer-assignment.txt"))
    if assignment.exists():
        kinds = allocation_summary(assignment.read_text())
        lines.append("allocations (GiB): " + ", ".join(f"{k} {v / GIB:.3f}" for k, v in sorted(kinds.items())))
    section = text.split("(peak):", 1)
    if len(section) < 2:
        return lines + ["(no 'Live ranges at ... (peak)' section in this XLA's dump)"]
    at_peak, _, breakdown = section[1].partition("Stack trace breakdown for peak usage:")
    values = re.findall(r"^\s+(\S+)\{[^}]*\}: (\d+) bytes", at_peak, flags=re.M)
    instructions = hlo_instructions(hlo)
    lines.append(f"largest of {len(values)} values live at the peak:")
    by_category: dict[str, int] = {}
    for i, (name, size) in enumerate(values):
        shape, op_name = instructions.get(name, ("", ""))
        category = _category(name, op_name)
        by_category[category] = by_category.get(category, 0) + int(size)
        if i < top:
            lines.append(f"  {int(size) / 2**20:9.1f} MiB  {shape:<30} {category:<28} {op_name[-100:] or name}")
    lines.append("values live at the peak, summed by where they come from:")
    for category, size in sorted(by_category.items(), key=lambda kv: -kv[1]):
        if size >= 2**20:
            lines.append(f"  {size / GIB:8.3f} GiB  {category}")
    total = re.match(r"\s*([0-9 ]+) bytes", breakdown)
    if total:
        lines.append(f"peak by op_name path ({int(total.group(1).replace(' ', '')) / GIB:.2f} GiB; nodes >= "
                     f"{min_percent:g}%, depth <= {max_depth}):")
    for depth, name, percent, size in _tree_nodes(breakdown):
        if percent >= min_percent and depth <= max_depth:
            lines.append(f"  {'  ' * depth}{name} {percent:.1f}% ({size / 2**20:.0f} MiB)")
    return lines


# ---- report --------------------------------------------------------------------------------------


def _gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def fit(points: list[Measurement]) -> tuple[float, float]:
    """(fixed bytes, bytes per clip per device) of the line through the two smallest batches."""
    a, b = sorted(points, key=lambda m: m.batch_per_device)[:2]
    slope = (b.peak - a.peak) / (b.batch_per_device - a.batch_per_device)
    return a.peak - slope * a.batch_per_device, slope


def git_state() -> str:
    root = pathlib.Path(__file__).resolve().parents[1]
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def measure_in_child(args: argparse.Namespace, setting: Setting, per_device: int, replicas: int, first: bool
                     ) -> tuple[Measurement, dict[str, Any]]:
    """`--fast`: one compile in a child process (its own dump folder; the first one in `--dump`)."""
    dump = args.dump if first else tempfile.mkdtemp(prefix="clover_memory_")
    cmd = [sys.executable, "-m", "benchmarks.memory", "--config", args.config, "--mesh", args.mesh,
           "--remat", "on" if setting.remat else "off", "--dtype", setting.dtype,
           "--microbatches", str(setting.microbatches), "--attention", setting.attention,
           "--child-batch", str(per_device), "--dump", dump]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env,
                          cwd=pathlib.Path(__file__).resolve().parents[1])
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise RuntimeError(f"child compile failed ({done.returncode}): {done.stderr[-2000:]}")
    r = json.loads(lines[-1])
    facts = {k: v for k, v in r.items()
             if k not in ("arguments", "outputs", "aliased", "temporaries", "compile_s")}
    return Measurement(setting, per_device * setting.microbatches, r["arguments"], r["outputs"], r["aliased"],
                       r["temporaries"], r["compile_s"]), facts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/pretrain.py:base")
    p.add_argument("--mesh", default="data=1", help="mesh axes, e.g. data=32 or data=8,fsdp=4 (devices = product)")
    p.add_argument("--devices", type=int, default=0, help="virtual CPU devices (default and only valid value: "
                                                          "the product of the mesh axes)")
    p.add_argument("--batch-per-device", default="2,4", help="two per-device batches for the line fit")
    p.add_argument("--verify", type=int, default=0, help="one more per-device batch compiled to check the line")
    p.add_argument("--remat", default="on", help="on,off")
    p.add_argument("--dtype", default="bf16", help="bf16,f32 (compute dtype; parameters stay float32)")
    p.add_argument("--microbatches", default="1", help="gradient-caching chunks, e.g. 1,4 (config.microbatches)")
    p.add_argument("--attention", default="-",
                   help="video batching (batched, per_clip) or window-attention kernel names ('-' = the config's own)")
    p.add_argument("--global-batch", type=int, default=1024, help="the paper's global batch, read off the line")
    p.add_argument("--capacity-gib", default="16,32,80", help="device memories for the largest batch that fits")
    p.add_argument("--dump", default="", help="XLA dump folder for the first compile; prints the peak's buffers")
    p.add_argument("--json", action="store_true", help="one JSON line per setting instead of Markdown")
    p.add_argument("--fast", action="store_true",
                   help="compile each size in a child process and read the sizes from XLA's buffer-assignment "
                        "dump as soon as it is written, skipping LLVM code generation (same numbers, ~half the time)")
    p.add_argument("--child-batch", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()

    mesh_axes = parse_mesh(args.mesh)
    devices = math.prod(mesh_axes.values())
    if args.devices and args.devices != devices:
        raise SystemExit(f"--devices {args.devices}: the mesh {mesh_axes} needs exactly {devices} devices")
    if args.fast and not args.child_batch and not args.dump:
        args.dump = tempfile.mkdtemp(prefix="clover_memory_")
    flags = [f"--xla_force_host_platform_device_count={devices}"]
    if args.dump:
        flags += [f"--xla_dump_to={args.dump}", "--xla_dump_hlo_as_text", "--xla_dump_hlo_module_re=.*jit_step.*"]
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from clover_jax.xla_cpu_flags import with_default_flags  # the CPU flags `clover_jax.train` compiles with

    os.environ["XLA_FLAGS"] = with_default_flags(" ".join([os.environ.get("XLA_FLAGS", "")] + flags))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax

    jax.config.update("jax_enable_compilation_cache", False)  # a cache hit would hide the compile
    replicas = mesh_axes["data"] * mesh_axes["fsdp"]  # the batch axes (sharding.BATCH_AXES)
    batches = [int(x) for x in _csv(args.batch_per_device)]
    if len(batches) != 2 or batches[0] == batches[1]:
        raise SystemExit("--batch-per-device: give two different per-device batches, e.g. 2,4")
    capacities = [float(x) for x in _csv(args.capacity_gib)]
    settings = [Setting(r == "on", d, int(k), a) for r in _csv(args.remat) for d in _csv(args.dtype)
                for k in _csv(args.microbatches) for a in _csv(args.attention)]

    if args.child_batch:  # one compile, one JSON line, then exit without waiting for code generation
        setting = settings[0]
        result = measure_from_dump(args.config, mesh_axes, replicas, setting, args.child_batch,
                                   pathlib.Path(args.dump))
        print(json.dumps(result), flush=True)
        os._exit(0)

    header = (f"{args.config}, mesh {mesh_axes} ({devices} virtual CPU devices, batch over {replicas}), "
              f"jax {jax.__version__}, code {git_state()}")
    if not args.json:
        print(f"\n{header}\nper device, GiB; peak = arguments + outputs - aliased + temporaries\n")
    rows, summary = [], []
    dumped = False
    for setting in settings:
        why = feature_available(args.config, setting)
        if why:
            result = dict(setting=dataclasses.asdict(setting), mesh=mesh_axes, unavailable=why)
            print(json.dumps(result) if args.json else f"{setting}: not measured: {why}", flush=True)
            continue
        points, facts = [], {}
        for b in batches + ([args.verify] if args.verify else []):
            if args.fast:
                m, facts = measure_in_child(args, setting, b, replicas, first=not dumped)
            else:
                m, facts = measure(args.config, mesh_axes, replicas, setting, b)
            points.append(m)
            if not args.json:
                print(f"  compiled {setting} b/device={m.batch_per_device}: peak {_gib(m.peak)} GiB "
                      f"(args {_gib(m.arguments)}, temps {_gib(m.temporaries)}), {m.compile_s:.0f} s", flush=True)
            if args.dump and not dumped:
                dumped = True
                summary += peak_buffers(pathlib.Path(args.dump))
        fixed, slope = fit(points[:2])
        per_device_paper = args.global_batch / replicas
        check = points[2] if args.verify else None
        predicted_check = fixed + slope * check.batch_per_device if check else float("nan")
        k = setting.microbatches
        fits = {c: max(0, int((c * GIB - fixed) / slope) // k * k) if slope > 0 else None for c in capacities}
        result = dict(
            setting=dataclasses.asdict(setting), mesh=mesh_axes, devices=devices, **facts,
            measurements=[dict(batch_per_device=m.batch_per_device, arguments=m.arguments, outputs=m.outputs,
                               aliased=m.aliased, temporaries=m.temporaries, peak=m.peak,
                               compile_s=round(m.compile_s, 1)) for m in points],
            fixed_bytes=fixed, bytes_per_clip=slope,
            paper_global_batch=args.global_batch, paper_per_device=per_device_paper,
            paper_peak_bytes=fixed + slope * per_device_paper,
            verify_error=(check.peak - predicted_check) / check.peak if check else None,
            max_batch_per_device={str(c): v for c, v in fits.items()}, code=git_state(),
        )
        if args.json:
            print(json.dumps(result), flush=True)
        rows.append((setting, points, fixed, slope, result))

    if args.json:
        return
    print("\n| remat | dtype | microbatches | attention | b/device | arguments | outputs | aliased | temps | peak "
          "| compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for setting, points, *_ in rows:
        for m in points:
            print(f"| {'on' if setting.remat else 'off'} | {setting.dtype} | {setting.microbatches} | "
                  f"{setting.attention} | {m.batch_per_device} | {_gib(m.arguments)} | {_gib(m.outputs)} | "
                  f"{_gib(m.aliased)} | {_gib(m.temporaries)} | {_gib(m.peak)} | {m.compile_s:.0f} |")
    cap_cols = " | ".join(f"max b/device @ {c:g} GiB" for c in capacities)
    print(f"\nline fit per setting (global batch {args.global_batch} = {args.global_batch / replicas:g} "
          f"per device on this mesh):\n")
    print(f"| remat | dtype | microbatches | attention | fixed GiB | MiB per clip | peak @ {args.global_batch} "
          f"| verify error | {cap_cols} |")
    print("|---|---|---|---|---|---|---|---|" + "---|" * len(capacities))
    for setting, points, fixed, slope, result in rows:
        err = result["verify_error"]
        caps = " | ".join(str(v) for v in result["max_batch_per_device"].values())
        print(f"| {'on' if setting.remat else 'off'} | {setting.dtype} | {setting.microbatches} | {setting.attention} "
              f"| {_gib(fixed)} | {slope / 2**20:.0f} | {_gib(result['paper_peak_bytes'])} | "
              f"{'-' if err is None else f'{100 * err:+.1f}%'} | {caps} |")
    if summary:
        print("\nlargest buffers live at the peak (first compile):")
        print("\n".join(summary))


if __name__ == "__main__":
    main()
