"""One command that turns a few minutes on one CUDA GPU into evidence that the 8xH100 path works.

    python bench/gpu_check.py --out gpu_check/                 # one H100 or H200, under 8 minutes
    python bench/gpu_check.py --cpu-smoke --out /tmp/smoke     # the same code, tiny, on CPU (tests run it)
    python bench/gpu_check.py --sections speed,end_of_run      # some sections only

Needs no network: the end-to-end run exports the embedded corpus, every other section makes its
own random bytes. Each section runs on its own: a failure is recorded with its traceback and the
next section still runs. Writes report.md and report.json to --out; exits 1 if any check failed.

1. correctness: per study trainer, on the GPU: causality by perturbation, the published parameter
   counts, a bf16 forward and backward with finite values, the compiled (inductor, fullgraph)
   training loss against eager, no recompilation when late QAT switches on (graphs counted), and
   compiled evaluation logits against eager.
2. speed: each published model at its published size, one rank's share of the 8-GPU batch (one
   micro-step: 65,536 tokens), after compilation: ms a step, bytes a second, peak memory, and the
   steps that would fit 600 s on 8 GPUs beside the published ones and the cost model's prediction.
   One GPU orthogonalises every Muon matrix (8 share them), so this is a slight over-estimate.
3. end_of_run: study 02's GPTQ calibration timed on 32 batches and extrapolated to the published
   256 and 512 against their 45 s and 120 s reserves; the int6 export of the published model (its
   time and size); the sliding evaluation (stride 64) timed on a known number of tokens and
   extrapolated to the whole validation split on 8 GPUs against the 600 s evaluation limit.
4. end_to_end: a short study-02 run under torchrun --nproc_per_node=1 (NCCL on CUDA) through
   GPTQ, export and both evaluations, then eval_bpb.py on its artifact: the two scores compared.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
NEEDED = ("torch", "numpy", "sentencepiece", "zstandard", "tqdm")
SECTIONS = ("correctness", "speed", "end_of_run", "end_to_end")
# Published on 8xH100: (study, runs.json run, ms a step, steps in 600 s)
PUBLISHED_SPEED = {"02": ("byte260_10min", 93.0, 5957), "01": ("byte260_10min", 133.0, 4520),
                   "baseline": ("baseline_gpt_sp1024_10min", 43.5, None), "03": ("byte260_10min", None, None)}
SPEC_PARAMS = {"01": 17_455_176, "02": 22_966_880, "baseline": 17_059_912}
VAL_TOKENS_BYTE260 = 151_130_112  # the whole FineWeb validation split (SPEC 3.4)
RANK_TOKENS = 524_288 // 8  # one rank's share of a step on 8 GPUs


def missing_packages() -> list[str]:
    missing = []
    for name in NEEDED:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


class Check:
    """Accumulates the rows of one section: (check, value, ok)."""

    def __init__(self):
        self.rows = []

    def add(self, name: str, value, ok: bool | None = None) -> None:
        self.rows.append({"check": name, "value": value, "ok": ok})


def trainers(smoke: bool) -> dict:
    from harness import modules

    names = ("01", "02") + (("03",) if any((ROOT / "studies").glob("03_*/train_gpt.py")) else ())
    return {s: modules.trainer_of(modules.study_dir(s)) for s in names}


def has_preset(study: str, run: str) -> bool:
    """Whether a study exists here and names this run (study 03's 8xH100 presets come with its recipe)."""
    from harness import modules

    return any((ROOT / "studies").glob(f"{study}_*/train_gpt.py")) and run in modules.load_runs(modules.study_dir(study))


def small_env(t, smoke: bool, **extra) -> dict:
    env = {"MODEL_DIM": "32", "NUM_HEADS": "2", "NUM_KV_HEADS": "1", "NUM_LAYERS": "4", "OUTER_LAYERS": "1",
           "TRAIN_SEQ_LEN": "64", "TRAIN_BATCH_TOKENS": "1024"} if smoke else \
        {"MODEL_DIM": "256", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "NUM_LAYERS": "6", "OUTER_LAYERS": "1",
         "TRAIN_SEQ_LEN": "512", "TRAIN_BATCH_TOKENS": "32768"}
    env.update(extra)
    known = set(t.Hyperparameters.__dataclass_fields__)
    return {k: v for k, v in env.items() if k.lower() in known}


def device_of(smoke: bool):
    import torch

    return torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")


def backend(smoke: bool) -> str:
    return "aot_eager" if smoke else "inductor"


def correctness(args, out: Check) -> None:
    import torch
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    device = device_of(args.cpu_smoke)
    for study, t in trainers(args.cpu_smoke).items():
        with torch.device("meta"):
            n = sum(p.numel() for p in t.HNet(t.Hyperparameters.from_env({})[0]).parameters())
        if study in SPEC_PARAMS:
            out.add(f"{study}: published parameter count", f"{n:,}", n == SPEC_PARAMS[study])
        hp, _ = t.Hyperparameters.from_env(small_env(t, args.cpu_smoke))
        torch.manual_seed(0)
        model = t.HNet(hp).to(device)
        with torch.no_grad():  # non-zero weights everywhere, so a leak through a zero-init projection shows
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        model.eval()
        L = hp.train_seq_len
        x = torch.randint(4, 260, (2, L), device=device)
        t_cut = L // 2
        y = x.clone()
        y[:, t_cut + 1:] = torch.randint(4, 260, (2, L - t_cut - 1), device=device)
        with torch.no_grad():
            a = model.logits(model.hidden_states(x)[0])
            b = model.logits(model.hidden_states(y)[0])
        diff = (a[:, :t_cut + 1] - b[:, :t_cut + 1]).abs().max().item()
        out.add(f"{study}: causality (bytes after t changed, logits up to t)", f"max |diff| {diff:.1e}", diff < 1e-4)
        model.train()
        ctx = torch.autocast(device.type, dtype=torch.bfloat16)
        with ctx:
            res = model(x, x)
            loss = res.loss.mean() + hp.ratio_loss_weight * res.ratio_loss
        loss.backward()
        finite = torch.isfinite(loss).item() and all(torch.isfinite(p.grad).all().item()
                                                      for p in model.parameters() if p.grad is not None)
        out.add(f"{study}: bf16 forward and backward finite", f"loss {loss.item():.4f}", bool(finite))
        model.zero_grad(set_to_none=True)
        if not hasattr(hp, "compile_model"):
            out.add(f"{study}: torch.compile", "not used (dynamic chunk count, as published)", None)
            continue
        torch._dynamo.reset()
        counter = CompileCounterWithBackend(backend(args.cpu_smoke))
        compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
        with ctx:
            eager = model(x, x).loss.mean().item()
            fast = compiled(x, x).loss.mean().item()
        out.add(f"{study}: compiled training loss vs eager (bf16)", f"{fast:.5f} vs {eager:.5f}",
                abs(fast - eager) < 2e-2 * abs(eager))
        graphs = counter.frame_count
        if hasattr(t, "refresh_qat"):
            t.refresh_qat(model, True, True)
            with ctx:
                compiled(x, x)
            out.add(f"{study}: no recompile when late QAT switches on", f"graphs {graphs} -> {counter.frame_count}",
                    counter.frame_count == graphs)
            t.refresh_qat(model, False, True)
        model.eval()
        with torch.no_grad(), ctx:
            e = model.logits(model.hidden_states(x)[0]).float()
            c = compiled(x, x).loss
            ce = torch.nn.functional.cross_entropy(e.flatten(0, 1), x.flatten(), reduction="none").view_as(c)
        rel = ((c - ce).abs().max() / ce.abs().max()).item()
        out.add(f"{study}: compiled evaluation loss vs eager (bf16)", f"max rel diff {rel:.1e}", rel < 2e-2)


def speed_env(study: str, t, smoke: bool) -> dict:
    from harness import modules

    run = PUBLISHED_SPEED[study][0]
    env = dict(modules.load_runs(modules.study_dir("02" if study == "baseline" else study))[run]["env"])
    env = {k: v for k, v in env.items() if k not in ("DATA_PATH", "TOKENIZER_PATH")}
    if env.get("VOCAB_SIZE") == "1024":
        env["TOKENIZER_PATH"] = "x.model"  # the shape only; no tokenizer is read here
    env["TRAIN_BATCH_TOKENS"] = str(RANK_TOKENS)
    if smoke:
        gpt = env.get("OUTER_LAYERS") == "0"
        env.update(small_env(t, True))
        env.update({"TRAIN_BATCH_TOKENS": "512", "OUTER_LAYERS": "0" if gpt else "1"})
        env["KEEP_FLOAT_MAX_NUMEL"] = "256"  # so the tiny matrices are quantised too
        if "eval_stride" in t.Hyperparameters.__dataclass_fields__:
            env["EVAL_STRIDE"] = "16"
    return env


def bench_hnet():
    from harness import modules

    return modules.import_file(ROOT / "bench" / "bench_hnet.py")  # its RandomBytes loader and synchronize


def timing_luts(t, hp, device):
    """Byte tables for the step's statistics only: sp1024's shapes need no real tokenizer to time."""
    import torch

    if not hp.uses_sentencepiece:
        return t.build_byte_luts(hp, device)
    v = hp.vocab_size
    return t.ByteLuts(torch.ones(v, dtype=torch.long, device=device), torch.zeros(v, dtype=torch.bool, device=device),
                      torch.zeros(v, dtype=torch.bool, device=device))


def speed(args, out: Check) -> None:
    import torch

    from harness import cost, modules

    RandomBytes, synchronize = bench_hnet().RandomBytes, bench_hnet().synchronize
    device = device_of(args.cpu_smoke)
    studies = ["02", "01", "baseline"] + (["03"] if has_preset("03", PUBLISHED_SPEED["03"][0]) else [])
    for study in studies:
        t = modules.trainer_of(modules.study_dir("02" if study == "baseline" else study))
        hp, _ = t.Hyperparameters.from_env(speed_env(study, t, args.cpu_smoke))
        rt = t.Runtime(device, grad_accum_steps=1)  # one rank of 8: one micro-step a step
        if hasattr(rt, "compile"):
            rt.compile = hp.compile_model != 0
        if not args.cpu_smoke:
            rt.autocast_dtype = torch.bfloat16
        torch.manual_seed(0)
        model = t.HNet(hp).to(device)
        compiled = model
        if getattr(rt, "compile", False):
            compiled = torch.compile(model, dynamic=False, fullgraph=True, backend=backend(args.cpu_smoke))
        fields = dict(hp=hp, rt=rt, log=lambda *a, **k: None, run_dir=ROOT, model=model,
                      optimizers=t.build_optimizers(model, hp, rt),
                      loader=RandomBytes(rt, hp.train_batch_tokens // hp.train_seq_len, hp.train_seq_len),
                      val_tokens=torch.zeros(0), luts=timing_luts(t, hp, device), data={})
        if "compiled" in t.Run.__dataclass_fields__:
            fields["compiled"] = compiled
        run = t.Run(**fields)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            t.train_step(run, 1.0, time.perf_counter())
        synchronize(device)
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.steps):
            t.train_step(run, 1.0, time.perf_counter())
        synchronize(device)
        ms = 1000 * (time.perf_counter() - t0) / args.steps
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        label, published_ms, published_steps = PUBLISHED_SPEED[study]
        full_env = dict(modules.load_runs(modules.study_dir("02" if study == "baseline" else study))[label]["env"])
        full_hp, _ = t.Hyperparameters.from_env({k: v for k, v in full_env.items() if k not in ("DATA_PATH",)})
        predicted = cost.cost_model(t, full_hp)["predicted_ms_per_step"]
        steps = int((600 - getattr(full_hp, "reserve_seconds", 0.0)) * 1000 / ms)
        pub = f"published {published_ms:g} ms" + (f", {published_steps:,} steps" if published_steps else "") \
            if published_ms else "no published time"
        out.add(f"{study} {label}: ms a step (one rank's share, {hp.train_batch_tokens:,} tokens)",
                f"{ms:.1f} ms ({pub}; cost model {predicted:.1f} ms); {hp.train_batch_tokens / ms * 1000:,.0f} tokens/s; "
                f"compile + {args.warmup} steps {compile_s:.0f} s; peak {peak:.1f} GiB; ~{steps:,} steps in 600 s on 8",
                None)


def end_of_run(args, out: Check) -> None:
    import torch

    from harness import modules

    synchronize = bench_hnet().synchronize
    device = device_of(args.cpu_smoke)
    t = modules.trainer_of(modules.study_dir("02"))
    env = speed_env("02", t, args.cpu_smoke)
    hp, _ = t.Hyperparameters.from_env(env)
    rt = t.Runtime(device, grad_accum_steps=1, autocast_dtype=None if args.cpu_smoke else torch.bfloat16)
    torch.manual_seed(0)
    model = t.HNet(hp).to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    linears = {f"{n}.weight": m for n, m in model.named_modules()
               if isinstance(m, t.CastedLinear) and m.weight.numel() > hp.keep_float_max_numel}
    sums, counts = {}, {}
    hooks = [m.register_forward_hook(t.hessian_hook(sums, counts, k, device.type)) for k, m in linears.items()]
    batches = 4 if args.cpu_smoke else 32
    seqs = hp.train_batch_tokens // hp.train_seq_len
    model.eval()
    synchronize(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(batches):
            x = torch.randint(4, 260, (seqs, hp.train_seq_len), device=device)
            with rt.autocast():
                model(x, x)
    synchronize(device)
    per_batch = (time.perf_counter() - t0) / batches
    for h in hooks:
        h.remove()
    judged = not args.cpu_smoke  # the budgets are 8xH100 budgets: on a CPU the times are only printed
    for k_batches, reserve in ((256, 45), (512, 120)):
        out.add(f"GPTQ calibration, {k_batches} batches (timed {batches})", f"{per_batch * k_batches:.1f} s against "
                f"a reserve of {reserve} s", per_batch * k_batches < reserve if judged else None)
    hessians = {k: (sums[k] / counts[k]).cpu() for k in sums}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    t0 = time.perf_counter()
    payload = t.quantize_state_dict(state, "int6", hp, hessians, {})
    blob = t.compress(payload, "int6")
    total = len(blob) + t.code_bytes()
    out.add("int6 GPTQ export of the published model (random weights)",
            f"{time.perf_counter() - t0:.1f} s, {total:,} bytes with the code", total <= t.SIZE_CAP_BYTES)
    tokens = 4096 if args.cpu_smoke else 262_144
    val = torch.randint(4, 260, (tokens + 1,))
    luts = t.build_byte_luts(hp, device)
    eval_hp, _ = t.Hyperparameters.from_env({**env, "EVAL_BATCH_SEQS": "16" if not args.cpu_smoke else "4"})
    synchronize(device)
    t0 = time.perf_counter()
    res = t.evaluate_bpb(model, rt, eval_hp, val, luts, stride=eval_hp.eval_stride)
    synchronize(device)
    seconds = time.perf_counter() - t0
    full = seconds * VAL_TOKENS_BYTE260 / tokens / 8
    out.add(f"sliding evaluation, stride {eval_hp.eval_stride}, {tokens:,} tokens",
            f"{seconds:.1f} s -> whole split on 8 GPUs ~{full:.0f} s against the 600 s limit "
            f"(bpb {res.val_bpb:.3f})", full < 600 if judged else None)


def end_to_end(args, out: Check) -> None:
    from harness import runs

    data = runs.export_corpus(runs.SAMPLE_DOCS, "byte260", runs.SAMPLE_EXPORT)
    work = Path(args.out) / "end_to_end"
    env = {**os.environ, **data, "OUTPUT_DIR": str(work), "RUN_ID": "gpu_check", "ITERATIONS": "30",
           "MAX_WALLCLOCK_SECONDS": "0", "WARMUP_STEPS": "3", "VAL_LOSS_EVERY": "0", "GPTQ_CALIB_BATCHES": "8",
           "VAL_MAX_TOKENS": "65536", "KEEP_FLOAT_MAX_NUMEL": "4096", "EVAL_BATCH_SEQS": "16",
           "MODEL_DIM": "128", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "NUM_LAYERS": "8", "OUTER_LAYERS": "2",
           "TRAIN_SEQ_LEN": "512", "TRAIN_BATCH_TOKENS": "32768", "EVAL_STRIDE": "256"}
    if args.cpu_smoke:
        env.update({"MODEL_DIM": "32", "NUM_HEADS": "2", "NUM_KV_HEADS": "1", "NUM_LAYERS": "4", "OUTER_LAYERS": "1",
                    "TRAIN_SEQ_LEN": "64", "TRAIN_BATCH_TOKENS": "1024", "ITERATIONS": "3", "VAL_MAX_TOKENS": "4096",
                    "EVAL_STRIDE": "32", "COMPILE_MODEL": "1", "COMPILE_BACKEND": "aot_eager", "WARMUP_STEPS": "1",
                    "KEEP_FLOAT_MAX_NUMEL": "256", "GPTQ_CALIB_BATCHES": "2"})
    trainer = ROOT / "studies" / "02_improved_hnet_byte260_and_sp1024" / "train_gpt.py"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                           str(trainer)], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    (Path(args.out) / "end_to_end_console.txt").write_text(proc.stdout + proc.stderr)
    ok = proc.returncode == 0
    out.add("torchrun --nproc_per_node=1: train, GPTQ, export, both evaluations",
            f"exit {proc.returncode} in {time.perf_counter() - t0:.0f} s", ok)
    if not ok:
        raise RuntimeError(proc.stderr[-3000:])
    sub = json.loads((work / "submission.json").read_text())
    report = Path(args.out) / "end_to_end_eval.json"
    proc = subprocess.run([sys.executable, str(ROOT / "eval_bpb.py"), str(work / "final_model.int6.ptz"),
                           "--json", str(report), "--no-boundaries"], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    ok = proc.returncode == 0
    out.add("eval_bpb.py on the artifact", f"exit {proc.returncode}", ok)
    if not ok:
        raise RuntimeError(proc.stderr[-3000:])
    r = json.loads(report.read_text())
    diff = abs(r["sliding"]["val_bpb"] - sub["val_bpb"])
    # the trainer scores its compiled model and eval_bpb the eager one: on CUDA (inductor, bf16) float
    # rounding apart, on CPU (aot_eager runs the same aten ops) equal
    out.add("trainer's sliding score vs eval_bpb's", f"{sub['val_bpb']:.6f} vs {r['sliding']['val_bpb']:.6f}",
            diff < (1e-6 if args.cpu_smoke else 1e-3))


def write_report(out_dir: Path, results: dict, meta: dict) -> bool:
    from harness import files

    lines = [f"# gpu_check: {meta['device']}, torch {meta['torch']}, {meta['date']}", ""]
    failed = False
    for section, r in results.items():
        lines += [f"## {section} ({r['seconds']:.0f} s)", ""]
        rows = [[row["check"], str(row["value"]), {True: "ok", False: "FAILED", None: ""}[row["ok"]]]
                for row in r["rows"]]
        if rows:
            lines += [files.markdown_table(["check", "value", ""], rows), ""]
        if r["error"]:
            lines += ["```", r["error"].rstrip(), "```", ""]
        failed = failed or bool(r["error"]) or any(row["ok"] is False for row in r["rows"])
    lines.append("result: " + ("FAILED" if failed else "every check passed"))
    files.write_atomic(out_dir / "report.md", "\n".join(lines) + "\n")
    files.write_atomic(out_dir / "report.json", json.dumps({"meta": meta, "results": results, "failed": failed},
                                                            indent=1) + "\n")
    return failed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for report.md, report.json and the run")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU: the same code, for tests")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"a subset of {', '.join(SECTIONS)}")
    p.add_argument("--steps", type=int, default=30, help="timed steps a model (speed)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first, compilation included (speed)")
    args = p.parse_args(argv)
    missing = missing_packages()
    if missing:
        print(f"error: missing Python packages: {', '.join(missing)}; install them first (pip install -r "
              f"requirements.txt; a CUDA build of torch, see the README)", file=sys.stderr)
        return 2
    import torch

    sections = args.sections.split(",")
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        p.error(f"--sections: unknown {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("error: no CUDA device (torch.cuda.is_available() is False); --cpu-smoke runs the same code on CPU",
              file=sys.stderr)
        return 2
    if args.cpu_smoke:
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cpu (smoke)" if args.cpu_smoke else torch.cuda.get_device_name(0)
    meta = {"device": device, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
            "argv": argv if argv is not None else sys.argv[1:]}
    results = {}
    for name in sections:
        check, t0, error = Check(), time.perf_counter(), ""
        print(f"=== {name}", flush=True)
        try:
            globals()[name](args, check)
        except Exception:  # recorded, and the next section still runs
            error = traceback.format_exc()
            print(error, file=sys.stderr, flush=True)
        results[name] = {"rows": check.rows, "error": error, "seconds": time.perf_counter() - t0}
        for row in check.rows:
            print(f"  {row['check']}: {row['value']} {'' if row['ok'] is None else 'ok' if row['ok'] else 'FAILED'}",
                  flush=True)
    failed = write_report(args.out, results, meta)
    print(f"{'FAILED' if failed else 'every check passed'}: {args.out / 'report.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
