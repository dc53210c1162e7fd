"""The `softwatch` command."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="SmolLM2-135M-Instruct",
                   help="embedded default, a Hugging Face id, a model directory or a .gguf file")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")


def _add_data_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help="dataset root: a path or a pyarrow.fs URI "
                   "(default: $SOFTWATCH_DATA or ./softwatch-data)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="softwatch", description="Watch the softmax of a served LLM.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a completion and print its per-token statistics")
    gen.add_argument("prompt")
    _add_model_args(gen)
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.add_argument("--data", default=None, help="also write its token and sequence records to this dataset root")
    gen.add_argument("--store-text", action="store_true", help="store prompt and completion text with the records")
    gen.add_argument("--engine", choices=["softwatch", "vllm"], default="softwatch",
                     help="softwatch's own engine, or vLLM with the softwatch observer")

    ckpt = sub.add_parser("checkpoint", help="print the checkpoint directory of a model (the embedded default is "
                          "converted once), for engines that load it themselves: `vllm serve $(softwatch checkpoint)`")
    ckpt.add_argument("model", nargs="?", default="SmolLM2-135M-Instruct")

    bench = sub.add_parser("bench", help="benchmarks, measured side by side in one run")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    dec = bench_sub.add_parser("decode", help="instrumented vs plain decode vs transformers generate")
    _add_model_args(dec)
    dec.add_argument("--batch", type=int, default=8)
    dec.add_argument("--new-tokens", type=int, default=64)
    dec.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    dec.add_argument("--top-p", type=float, default=1.0)
    dec.add_argument("--repeats", type=int, default=3)
    dec.add_argument("--json", action="store_true")

    bvllm = bench_sub.add_parser("vllm", help="plain vLLM vs vLLM with the softwatch observer vs vLLM logprobs=1 "
                                 "vs softwatch's engine, same prompts, interleaved")
    bvllm.add_argument("--model", default="SmolLM2-135M-Instruct")
    bvllm.add_argument("--batch", type=int, default=8)
    bvllm.add_argument("--new-tokens", type=int, default=64)
    bvllm.add_argument("--repeats", type=int, default=3)
    bvllm.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    bvllm.add_argument("--top-p", type=float, default=1.0)
    bvllm.add_argument("--json", action="store_true")

    store = bench_sub.add_parser("store", help="Parquet write throughput and a summary query over the rows")
    store.add_argument("--rows", type=int, default=10_000_000)
    store.add_argument("--data", default=None, help="dataset root to write (default: a new temporary directory)")
    store.add_argument("--json", action="store_true")
    bmon = bench_sub.add_parser("monitor", help="time and peak memory of one drift monitor run over a large "
                                "synthetic store (generated once and cached)")
    bmon.add_argument("--sequences", type=int, default=10_000_000, help="sequences in the store (default 10M)")
    bmon.add_argument("--new", type=int, default=None,
                      help="sequences added before the measured run (default: a minute of the day's traffic)")
    bmon.add_argument("--cache", default=None, help="where the generated store is cached "
                      "(default: $SOFTWATCH_CACHE/bench-monitor)")
    bmon.add_argument("--json", action="store_true")
    tel = bench_sub.add_parser("telemetry", help="cost of recording a sequence (metrics, records) vs decoding it")
    _add_model_args(tel)
    tel.add_argument("--batch", type=int, default=8)
    tel.add_argument("--new-tokens", type=int, default=64)
    tel.add_argument("--json", action="store_true")

    bserve = bench_sub.add_parser("serve", help="streamed completions through the Serve app on each engine, "
                                  "at several client concurrencies, in rotating turns")
    bserve.add_argument("--engines", default="softwatch,vllm",
                        help="softwatch: softwatch's engine; vllm: vLLM with the observer and vLLM without it")
    bserve.add_argument("--url", default=None, help="bench this running service instead (one variant)")
    bserve.add_argument("--model", default="SmolLM2-135M-Instruct")
    bserve.add_argument("--api-key", default=None, help="for --url")
    bserve.add_argument("--concurrency", default="1,8,32", help="client concurrencies, comma-separated")
    bserve.add_argument("--requests-per-client", type=int, default=2)
    bserve.add_argument("--max-tokens", type=int, default=64)
    bserve.add_argument("--temperature", type=float, default=0.7)
    bserve.add_argument("--rounds", type=int, default=3)
    bserve.add_argument("--json", action="store_true")

    bdrift = bench_sub.add_parser("drift", help="the drift monitor and Evidently on independently generated "
                                  "traffic: false alarms per comparison kind, detection rates")
    bdrift.add_argument("--model", default="SmolLM2-135M-Instruct")
    bdrift.add_argument("--device", default="auto")
    _add_data_arg(bdrift)
    bdrift.add_argument("--quick", action="store_true", help="a few tiny trials (for CI: the mechanics, not the figures)")
    bdrift.add_argument("--no-generate", action="store_true",
                        help="evaluate only the trials whose traffic is already generated (a partial result)")
    bdrift.add_argument("--generate-only", action="store_true",
                        help="generate the missing traffic (resumable) and stop")
    bdrift.add_argument("--json", action="store_true")

    sql = sub.add_parser("sql", help="run SQL over the tokens, sequences, drift_reports and probes views")
    sql.add_argument("query")
    _add_data_arg(sql)
    fmt = sql.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON object per row")
    fmt.add_argument("--csv", action="store_true")

    compact = sub.add_parser("compact", help="merge each partition's small Parquet files into large ones")
    _add_data_arg(compact)

    srv = sub.add_parser("serve", help="serve the model over an OpenAI-compatible API on Ray Serve")
    srv.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    srv.add_argument("--replicas", type=int, default=None)
    srv.add_argument("--engine", choices=["auto", "vllm", "softwatch"], default=None,
                     help="vllm: vLLM with the softwatch observer; softwatch: softwatch's own engine; "
                          "auto (default): vllm where it is installed")
    srv.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=None, help="default 8000")
    _add_data_arg(srv)
    srv.add_argument("--metrics", choices=["prometheus", "otlp", "none"], default=None, help="default prometheus")
    srv.add_argument("--journal", default=None,
                     help="write-ahead journal directory mounted on every node (NFS, EFS): with an object-store "
                          "--data, any node recovers the records of a node that died (default: next to a local "
                          "--data; on this node's disk for an object store)")
    srv.add_argument("--config", default=None, help="a Serve config file such as deploy/serve.yaml")
    srv.add_argument("--api-key", default=None,
                     help="require this bearer token (default $SOFTWATCH_API_KEY; --api-key-file keeps it out of "
                          "the process list)")
    srv.add_argument("--api-key-file", default=None,
                     help="require the bearer token in this file (read where the ingress runs: a mounted secret)")
    srv.add_argument("--ray-address", default=None,
                     help="Ray cluster to deploy on (default: the running one, else a new local one; 'local' forces new)")

    drift = sub.add_parser("drift", help="compare two selections of sequences (default: the newest regime "
                           "against the one before it) and write the report to drift_reports")
    _add_data_arg(drift)
    drift.add_argument("--baseline", default=None, help="key=value[,key=value...] over regime columns and since/until")
    drift.add_argument("--current", default=None, help="same form as --baseline")
    drift.add_argument("--pin", default=None, help="key=value[,...] over model_id, model_rev, params_id, temperature, "
                       "top_p, top_k: the baseline regime every newer one is compared with (e.g. a known-good "
                       "model_rev=...)")
    drift.add_argument("--json", action="store_true")

    rep = sub.add_parser("report", help="write the HTML drift report (self-contained: opens with no network)")
    _add_data_arg(rep)
    rep.add_argument("--out", default="softwatch-report.html")

    probe = sub.add_parser("probe", help="score the built-in probes teacher-forced on a model, store the scores, "
                           "and compare them with the previous model revision's (paired test)")
    _add_model_args(probe)
    _add_data_arg(probe)
    probe.add_argument("--quantize", type=int, default=None, metavar="BITS",
                       help="round the linear weights to BITS-bit integers first (a quantized revision)")
    probe.add_argument("--json", action="store_true")

    sw = sub.add_parser("sweep", help="the same prompts at several temperatures: one row of statistics each")
    _add_model_args(sw)
    sw.add_argument("--temperatures", default="0,0.4,0.7,1.0", help="comma-separated, each >= 0")
    sw.add_argument("--prompts", type=int, default=16, help="how many built-in prompts (1-%(default)s+)")
    sw.add_argument("--max-tokens", type=int, default=48)
    sw.add_argument("--top-p", type=float, default=1.0)
    sw.add_argument("--seed", type=int, default=0)
    sw.add_argument("--data", default=None, help="also store the records here (each temperature is a regime)")
    sw.add_argument("--json", action="store_true")

    snap = sub.add_parser("dashboard-snapshot", help="render every Grafana dashboard panel from a live Prometheus "
                          "into a PNG per dashboard")
    snap.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus base URL")
    snap.add_argument("--dashboards", default="dashboards", help="directory of dashboard JSON files")
    snap.add_argument("--minutes", type=float, default=60, help="time range to render")
    snap.add_argument("--out", default="dashboard-snapshots", help="output directory")

    demo = sub.add_parser("demo", help="the end-to-end demo: serve, traffic, a config push, drift, report, SQL")
    demo.add_argument("--model", default="SmolLM2-135M-Instruct")
    demo.add_argument("--engine", choices=["auto", "vllm", "softwatch"], default="auto",
                      help="auto (default): vLLM with the softwatch observer where vLLM is installed")
    demo.add_argument("--data", default="softwatch-demo-data", help="dataset root (default %(default)s)")
    demo.add_argument("--requests", type=int, default=200, help="in all; half before the push, half after")
    demo.add_argument("--concurrency", type=int, default=8)
    demo.add_argument("--max-tokens", type=int, default=48)
    demo.add_argument("--port", type=int, default=8000)
    demo.add_argument("--keep-running", action="store_true", help="leave the service up for exploration")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import duckdb

    from .completion import InvalidRequest
    from .models import ModelNotFoundError

    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "checkpoint":
            from .models import checkpoint

            print(checkpoint(args.model)[0])
            return 0
        if args.command == "bench":
            return {"decode": _bench_decode, "store": _bench_store, "telemetry": _bench_telemetry,
                    "serve": _bench_serve, "drift": _bench_drift, "vllm": _bench_vllm,
                    "monitor": _bench_monitor}[args.bench](args)
        if args.command == "sql":
            return _sql(args)
        if args.command == "compact":
            return _compact(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "drift":
            return _drift(args)
        if args.command == "report":
            return _report(args)
        if args.command == "probe":
            return _probe(args)
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "dashboard-snapshot":
            return _dashboard_snapshot(args)
        if args.command == "demo":
            return _demo(args)
    except (InvalidRequest, ModelNotFoundError, ValueError, TimeoutError, duckdb.Error) as exc:
        print(f"softwatch: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("softwatch: interrupted", file=sys.stderr)
        return 130
    return 0


def _load(args):
    from .models import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype)


def _generate(args) -> int:
    from .completion import DecodingParams

    params = DecodingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.seed, stop=tuple(args.stop))
    params.validate()  # before the model loads: a typo should not cost a load
    if not args.prompt:
        raise ValueError("prompt: must be a non-empty string")
    if args.engine == "vllm":
        from .vllm.generate import generate

        if args.device != "auto":
            raise ValueError("--device: vLLM runs on the device its build is for; leave it at auto")
        result = generate(args.prompt, params, model=args.model, chat=args.chat, data=args.data,
                          store_text=args.store_text, dtype=None if args.dtype == "auto" else args.dtype)
    else:
        result = _generate_here(args, params)
    if args.json:
        print(json.dumps(result, default=_json_number))
        return 0
    _print_generated(result)
    return 0


def _generate_here(args, params) -> dict:
    """The own engine's completion as {"text", "tokens", "summary", "regime"}."""
    from .engine import Engine

    lm = _load(args)
    completion = Engine(lm, max_batch=1).generate([args.prompt], params, chat=args.chat)[0]
    if args.data:
        from .records import RecordContext
        from .recorder import Recorder
        from .store import ParquetSink

        context = RecordContext(deployment="cli", replica=f"cli-{os.getpid()}", store_text=args.store_text)
        recorder = Recorder(context, ParquetSink(args.data))
        try:
            recorder.record(completion, args.prompt)
        finally:
            recorder.close()
    return {"text": completion.text, "tokens": completion.token_records(lm.tokenizer), "summary": completion.summary,
            "regime": completion.regime}


def _print_generated(result: dict) -> None:
    print(result["text"])
    print()
    print(_token_table(result["tokens"]))
    print()
    s = result["summary"]
    print(f"finish={s['finish_reason']}  tokens={s['generated_tokens']}  perplexity={s['perplexity']:.3f}  "
          f"mean_entropy={s['mean_entropy']:.3f}  min_top_prob={s['min_top_prob']:.3f}  "
          f"nonfinite={s['nonfinite']}  overflow={s['overflow']}  ttft={s['ttft_s']:.3f}s  latency={s['latency_s']:.3f}s")
    r = result["regime"]
    print(f"regime: model={r['model_id']} rev={r['model_rev']} params_id={r['params_id']} "
          f"(temperature={r['temperature']} top_p={r['top_p']} top_k={r['top_k']})")


def _json_number(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _token_table(tokens: list[dict]) -> str:
    header = f"{'pos':>4} {'id':>6} {'text':<14} {'logprob':>8} {'entropy':>8} {'top_prob':>8} {'margin':>7} {'rank':>5} {'samp_lp':>8}"
    lines = [header, "-" * len(header)]
    for i, t in enumerate(tokens):
        text = json.dumps(t["text"])[1:-1][:14]
        lines.append(f"{i:>4} {t['id']:>6} {text:<14} {t['logprob']:>8.3f} {t['entropy']:>8.3f} "
                     f"{t['top_prob']:>8.3f} {t['margin']:>7.3f} {t['rank']:>5} {t['sampling_logprob']:>8.3f}")
    return "\n".join(lines)


def _bench_decode(args) -> int:
    from . import bench
    from .bench.decode import decode

    if args.batch < 1 or args.new_tokens < 1 or args.repeats < 1:
        raise ValueError("--batch, --new-tokens and --repeats must be >= 1")
    lm = _load(args)
    print(f"bench decode: {lm.model_id} on {lm.device}, batch {args.batch}, {args.new_tokens} new tokens",
          file=sys.stderr)
    result = decode(lm, batch=args.batch, new_tokens=args.new_tokens, temperature=args.temperature,
                          top_p=args.top_p, repeats=args.repeats, progress=bench.print_progress)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"device: {result['device']}  model: {result['model']}  batch {result['batch']} x {result['new_tokens']} tokens")
    for key in ("instrumented_tok_s", "plain_tok_s", "hf_generate_tok_s", "hf_scores_tok_s"):
        print(f"  {key:<20} {result[key]:10.1f}")
    print(f"  {'overhead_ratio':<20} {result['overhead_ratio']:10.3f}   (instrumented time / plain time)")
    print(f"  {'vs_hf_ratio':<20} {result['vs_hf_ratio']:10.3f}   (HF generate time / instrumented time, same rounds)")
    print(f"  {'same_tokens':<20} {str(result['same_tokens']):>10}")
    for shape in result["stats_shapes"]:
        print(f"  stats {shape['shape']}: softwatch {shape['stats_ms']:.3f} ms, naive {shape['naive_stats_ms']:.3f} ms "
              f"({shape['naive_over_stats']:.1f}x), one read {shape['one_read_ms']:.3f} ms")
    return 0


def _bench_vllm(args) -> int:
    from . import bench
    from .bench.vllm import bench_vllm

    if args.batch < 1 or args.new_tokens < 1 or args.repeats < 1:
        raise ValueError("--batch, --new-tokens and --repeats must be >= 1")
    result = bench_vllm(args.model, batch=args.batch, new_tokens=args.new_tokens, repeats=args.repeats,
                        temperature=args.temperature, top_p=args.top_p, progress=bench.print_progress)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for key in ("plain_tok_s", "observed_tok_s", "logprobs_tok_s", "softwatch_tok_s"):
        print(f"  {key:<20} {result[key]:10.1f}")
    print(f"  {'overhead_ratio':<20} {result['overhead_ratio']:10.3f}   (observed time / plain time)")
    print(f"  {'vllm_logprobs_ratio':<20} {result['vllm_logprobs_ratio']:10.3f}   (logprobs=1 time / plain time)")
    print(f"  {'same_tokens':<20} {str(result['same_tokens']):>10}")
    return 0


def _bench_store(args) -> int:
    from . import bench
    from .bench.store import store

    if args.rows < 1:
        raise ValueError("--rows must be >= 1")
    result = store(args.rows, args.data, progress=bench.print_progress)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    where = f"written to {result['root']}" if result["root"] else "written to a temporary directory, now removed"
    print(f"rows {result['rows']:,} in {result['sequences']:,} sequences, {where}")
    print(f"  {'write_rows_per_s':<18} {result['write_rows_per_s']:14,.0f}")
    print(f"  {'query_s':<18} {result['query_s']:14.3f}   (per-regime, per-hour counts, means and quantiles; "
          f"{result['query_groups']} groups)")
    return 0


def _bench_monitor(args) -> int:
    from . import bench
    from .bench.monitor import run

    result = run(args.sequences, args.new, args.cache, progress=bench.print_progress)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"monitor run over {result['sequences']:,} sequences ({result['regimes']} regimes, {result['files']} files), "
          f"{result['new_sequences']:,} of them new since the previous run; {result['cpus']} CPUs")
    print(f"  {'run_s':<18} {result['run_s']:10.2f}   (target <= 10)")
    print(f"  {'peak_rss_mb':<18} {result['peak_rss_mb']:10.0f}   (target <= 2048)")
    print(f"  {'first_run_s':<18} {result['first_run_s']:10.2f}   (the first run: builds the index, feeds the history)")
    print(f"  {'first_peak_rss_mb':<18} {result['first_peak_rss_mb']:10.0f}")
    return 0


def _bench_telemetry(args) -> int:
    from . import bench
    from .bench.telemetry import telemetry

    if args.batch < 1 or args.new_tokens < 1:
        raise ValueError("--batch and --new-tokens must be >= 1")
    result = telemetry(_load(args), args.batch, args.new_tokens, progress=bench.print_progress)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"device: {result['device']}  model: {result['model']}  batch {result['batch']} x {result['new_tokens']} tokens")
    print(f"  {'decode_ms_per_sequence':<26} {result['decode_ms_per_sequence']:10.1f}")
    print(f"  {'telemetry_us_per_sequence':<26} {result['telemetry_us_per_sequence']:10.1f}   "
          f"({100 * result['telemetry_fraction']:.4f}% of decode)")
    print(f"  {'sink_add_us_per_sequence':<26} {result['sink_add_us_per_sequence']:10.1f}   (on the decode loop)")
    print(f"  {'records_us_per_sequence':<26} {result['records_us_per_sequence']:10.1f}   "
          f"({100 * result['records_fraction']:.4f}% of decode, on the sink's thread)")
    return 0


def _bench_serve(args) -> int:
    from . import bench
    from .bench.serve import VARIANTS, bench as bench_serve

    concurrencies = _positive_ints(args.concurrency, "--concurrency")
    if min(args.requests_per_client, args.max_tokens, args.rounds) < 1:
        raise ValueError("--requests-per-client, --max-tokens and --rounds must be >= 1")
    if args.url:
        urls = {"service": args.url.rstrip("/")}
        result = bench_serve(urls, _served_model(args.url, args.api_key), args.api_key, concurrencies,
                             args.requests_per_client, args.max_tokens, args.rounds, args.temperature,
                             bench.print_progress)
    else:
        variants = [v for engine in _names(args.engines, "--engines", ("softwatch", "vllm"))
                    for v in VARIANTS if VARIANTS[v][0] == engine]
        with _bench_services(args.model, variants) as urls:
            result = bench_serve(urls, args.model, None, concurrencies, args.requests_per_client, args.max_tokens,
                                 args.rounds, args.temperature, bench.print_progress)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(serve_table(result))
    return 0


def _positive_ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag}: comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{flag}: every value must be >= 1, got {text!r}")
    return values


def _names(text: str, flag: str, allowed: tuple[str, ...]) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = sorted(set(names) - set(allowed))
    if unknown or not names:
        raise ValueError(f"{flag}: choose from {', '.join(allowed)}, got {text!r}")
    return list(dict.fromkeys(names))


def _served_model(url: str, api_key: str | None) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.get(f"{url.rstrip('/')}/v1/models", headers=headers, timeout=60).json()["data"][0]["id"]


@contextlib.contextmanager
def _bench_services(model: str, variants: list[str]):
    """Every variant as its own Serve app (route prefix /<variant>) on a local Ray cluster, all at
    once; yields variant -> base URL."""
    import socket
    import tempfile

    import ray
    from ray import serve as ray_serve

    from . import bench
    from .bench.serve import VARIANTS
    from .serve.app import application, deploy

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="softwatch-bench-serve-") as scratch:
        bench.print_progress(f"starting {', '.join(variants)} on {model}")
        # Logical CPUs enough for every app at once: the variants take turns, never decode together.
        ray.init(num_cpus=4 * len(variants), include_dashboard=False, log_to_driver=False)
        try:
            apps = [application({"model": model, "engine": VARIANTS[v][0], "observe": VARIANTS[v][1],
                                 "data": os.path.join(scratch, v), "metrics": "none", "num_cpus": 0.5,
                                 "drift": {"interval_s": 86400}}, name=v, route_prefix=f"/{v}")
                    for v in variants]
            deploy(apps, port=port)
            yield {v: f"http://127.0.0.1:{port}/{v}" for v in variants}
        finally:
            # Deleting the apps drains their replicas; stopping Serve's controller makes Ray print
            # task errors onto stdout, where --json output goes.
            try:
                for v in variants:
                    ray_serve.delete(v)
            finally:
                ray.shutdown()


def serve_table(result: dict) -> str:
    lines = [f"{result['model']}, {result['max_tokens']} tokens per request at T={result['temperature']}, "
             f"{result['rounds']} rounds"]
    lines.append(f"  {'variant':<12} {'clients':>7} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} "
                 f"{'tok p50':>8} {'tok p99':>8}")
    for variant, by_concurrency in result["variants"].items():
        for c, s in by_concurrency.items():
            lines.append(f"  {variant:<12} {c:>7} {s['tok_s']:8.1f} {s['ttft_p50_s']:9.3f} {s['ttft_p99_s']:9.3f} "
                         f"{s['token_latency_p50_s'] or 0:8.3f} {s['token_latency_p99_s'] or 0:8.3f}")
    for key in ("vllm_vs_softwatch", "observer_overhead"):
        if result[key] is not None:
            lines.append(f"  {key} {result[key]:.3f}")
    return "\n".join(lines)


def _bench_drift(args) -> int:
    from .bench.drift import generate_traffic, run

    if args.generate_only and args.no_generate:
        print("softwatch: --generate-only and --no-generate exclude each other", file=sys.stderr)
        return 2
    if args.generate_only:
        made = generate_traffic(args.model, args.data, quick=args.quick, device=args.device)
        print(f"generated {made} segments")
        return 0
    result = run(args.model, args.data, quick=args.quick, device=args.device, generate_missing=not args.no_generate)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(drift_table(result))
    return 0


def drift_table(result: dict) -> str:
    """The README's table of a `bench drift` result."""
    from .bench.drift import format_rate

    lines = [("PARTIAL: " if result["partial"] else "") + f"trials evaluated {result['trials_evaluated']}",
             "| no change (null trials) | false alarms / checks [95% CI], one-sided upper 95% |", "|---|---|"]
    for kind, r in result["false_alarm_rate"].items():
        lines.append(f"| softwatch {kind} | {format_rate(r)} |")
    lines.append(f"| softwatch regime, first look only | {format_rate(result['regime_first_look'])} |")
    ev = result["evidently"]
    lines.append(f"| Evidently defaults | {format_rate(ev['default']['false_alarm_rate'])} |")
    lines.append(f"| Evidently per column, p < {ev['per_column_matched']['threshold']:.3g} | "
                 f"{format_rate(ev['per_column_matched']['false_alarm_rate'])} |")
    lines += ["", "| change | softwatch regime | Evidently defaults | Evidently per column (matched) |", "|---|---|---|---|"]
    for change, r in result["detection_rate"].items():
        lines.append(f"| {change} | {format_rate(r)} | {format_rate(ev['default']['detection_rate'][change])} | "
                     f"{format_rate(ev['per_column_matched']['detection_rate'][change])} |")
    if "probes" in result:
        p = result["probes"]
        lines.append(f"\nprobes ({p['prompts']} prompts): false alarms {format_rate(p['false_alarm_rate'])}, "
                     f"weights_int8 detected {format_rate(p['detection_rate']['weights_int8'])}")
    return "\n".join(lines)


def _sql(args) -> int:
    from .store import Store

    store = Store(args.data)
    table = store.query(args.query)
    if args.csv:
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, sys.stdout.buffer)
    elif args.json:
        for row in table.to_pylist():
            print(json.dumps(row, default=_json_value))
    else:
        print(format_table(table))
    return 0


def _json_value(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v.isoformat() if hasattr(v, "isoformat") else str(v)


def format_table(table, max_rows: int = 100) -> str:
    """A plain-text table of an Arrow table's first `max_rows` rows."""
    names = table.column_names
    rows = [[_cell(v) for v in row.values()] for row in table.slice(0, max_rows).to_pylist()]
    widths = [max([len(n)] + [len(r[i]) for r in rows]) for i, n in enumerate(names)]
    lines = ["  ".join(n.ljust(w) for n, w in zip(names, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    if table.num_rows > max_rows:
        lines.append(f"... {table.num_rows - max_rows} more rows ({table.num_rows} in all)")
    return "\n".join(lines)


def _cell(v) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _numeric(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _compact(args) -> int:
    from .rootlock import CompactionRunning
    from .store import compact, default_root

    root = args.data or default_root()
    try:
        result = compact(root, progress=lambda m: print(f"  {m}", file=sys.stderr, flush=True))
    except CompactionRunning as exc:
        print(f"softwatch: {exc}; try again when it is done", file=sys.stderr)
        return 1
    print(f"compacted {root}: {result.partitions} partitions, {result.files_before} files -> {result.files_after}, "
          f"{result.rows_moved:,} rows rewritten, {result.stale_removed} stale temporary files removed")
    return 0


def _drift(args) -> int:
    from .drift.monitor import Filter, FilterError, Monitor, MonitorConfig
    from .drift.regimes import PinError
    from .store import default_root

    try:
        config = MonitorConfig(pin=args.pin)
    except FilterError as exc:
        raise ValueError(f"--pin: {exc}") from None
    if args.pin and (args.baseline or args.current):
        raise ValueError("--pin: give either --pin or --baseline/--current")
    monitor = Monitor(args.data or default_root(), config)
    if args.baseline or args.current:
        if not (args.baseline and args.current):
            raise ValueError("give both --baseline and --current, or neither (newest regime vs the one before)")
        report = monitor.compare(Filter.parse(args.baseline), Filter.parse(args.current))
    else:
        try:
            report = monitor.run()
        except PinError as exc:
            raise ValueError(f"--pin: {exc}") from None
    return _print_report(report, args.json, "no sequences to compare yet")


def _report(args) -> int:
    from .drift.monitor import Monitor
    from .drift.report import render
    from .store import default_root

    verdict = render(Monitor(args.data or default_root()), args.out)
    print(f"wrote {args.out} (verdict: {verdict})")
    return 0


def _probe(args) -> int:
    from .drift.monitor import Monitor
    from .models import quantize_weights
    from .store import default_root

    lm = _load(args)
    if args.quantize:
        lm = quantize_weights(lm, args.quantize)
    print(f"softwatch probe: scoring {lm.model_id}@{lm.model_rev}", file=sys.stderr)
    report = Monitor(args.data or default_root()).probe(lm)
    return _print_report(report, args.json, f"stored the probe scores of {lm.model_id}@{lm.model_rev}: "
                         "the first revision scored is the baseline of the next")


def _print_report(report, as_json: bool, empty: str) -> int:
    if as_json:
        print(json.dumps({"report_id": report.report_id, "verdict": report.verdict, "rows": report.rows},
                         default=_json_value))
        return 0
    if not report.rows:
        print(empty)
        return 0
    print(format_table(report.table().select(
        ["kind", "metric", "test", "statistic", "p_value", "effect_size", "n_baseline", "n_current", "verdict"])))
    print(f"\nverdict: {report.verdict}  (report {report.report_id}, written to drift_reports)")
    return 0


def _sweep(args) -> int:
    from . import bench
    from .prompts import prompt_set
    from .store import ParquetSink
    from .sweep import COLUMNS, sweep

    try:
        temperatures = [float(t) for t in args.temperatures.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--temperatures must be comma-separated numbers, got {args.temperatures!r}") from None
    if not temperatures or any(not math.isfinite(t) or t < 0 for t in temperatures):
        raise ValueError("--temperatures must be finite numbers >= 0")
    if not 1 <= args.prompts <= len(prompt_set()):
        raise ValueError(f"--prompts must be in [1, {len(prompt_set())}]")
    lm = _load(args)
    sink = ParquetSink(args.data) if args.data else None
    try:
        rows = sweep(lm, temperatures, prompts=args.prompts, max_tokens=args.max_tokens, top_p=args.top_p,
                     seed=args.seed, sink=sink, progress=bench.print_progress)
    finally:
        if sink is not None:
            sink.close()
    if args.json:
        print(json.dumps(rows, default=_json_value))
    else:
        import pyarrow as pa

        print(format_table(pa.Table.from_pylist(rows).select(list(COLUMNS))))
    return 0


def _dashboard_snapshot(args) -> int:
    import urllib.error

    from .dashboards import load, snapshot

    for name, dashboard in load(args.dashboards).items():
        try:
            path = snapshot(args.prometheus, dashboard, os.path.join(args.out, f"{name}.png"), args.minutes)
        except urllib.error.URLError as exc:
            raise ValueError(f"cannot reach Prometheus at {args.prometheus}: {exc.reason}") from None
        print(f"wrote {path}")
    return 0


def _serve(args) -> int:
    import signal
    import time

    from .serve.app import APP_NAME, args_from_config, run
    from .store import default_root

    app_args, http = args_from_config(args.config) if args.config else ({}, {})
    journal = os.path.abspath(args.journal) if args.journal else None
    for key, value in (("model", args.model), ("replicas", args.replicas), ("data", args.data),
                       ("metrics", args.metrics), ("engine", args.engine), ("journal", journal)):
        if value is not None:
            app_args[key] = value
    key_dir = _deliver_api_key(args, app_args)
    app_args.setdefault("data", default_root())
    app_args.setdefault("metrics", "prometheus")
    host = args.host or http.get("host", "127.0.0.1")
    port = args.port or int(http.get("port", 8000))
    if "num_gpus" not in app_args:
        import torch

        app_args["num_gpus"] = 1 if torch.cuda.is_available() else 0

    import ray
    from ray import serve

    from .vllm import resolve_engine

    engine = resolve_engine(app_args.get("engine", "auto"), app_args.get("model", "SmolLM2-135M-Instruct"))
    print(f"softwatch serve: starting Ray and deploying {app_args.get('model', 'SmolLM2-135M-Instruct')} on "
          f"{'vLLM with the softwatch observer' if engine == 'vllm' else 'softwatch engine'} "
          "(first start takes a minute)", file=sys.stderr, flush=True)
    if args.ray_address:
        ray.init(address=args.ray_address, include_dashboard=False)
    else:
        try:
            ray.init(address="auto", include_dashboard=False)
        except ConnectionError:
            ray.init(include_dashboard=False)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    # Ctrl-C must stop the service even when this process inherited SIGINT as ignored (a
    # background job of a non-interactive shell does), in which case Python never raises it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        run(app_args, host=host, port=port)
        print(f"serving on http://{host}:{port}/v1  (OpenAI-compatible; GET /healthz)", flush=True)
        print(f"records: {app_args['data']}   metrics: {app_args['metrics']}"
              + (f" (Prometheus file_sd targets under {app_args['data']}/prometheus/targets)"
                 if app_args["metrics"] == "prometheus" else ""), flush=True)
        print("Ctrl-C stops", flush=True)
        while not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        print("softwatch serve: shutting down (finishing in-flight requests, flushing records)", file=sys.stderr,
              flush=True)
        # deleting only our app drains its replicas and leaves Serve to any other app of a shared
        # cluster; stopping the controller while its actors wind down makes the raylet print errors
        serve.delete(APP_NAME)
        ray.shutdown()
        if key_dir is not None:
            key_dir.cleanup()
    return 0


def _deliver_api_key(args, app_args: dict):
    """Point the app at the API key without putting the key in its args (which `serve config`
    shows): --api-key-file as given; a key from --api-key or $SOFTWATCH_API_KEY goes into a file
    only this user can read, for the ingress on this machine. Returns that file's directory."""
    import tempfile

    from .serve.auth import ENV_VAR

    key = args.api_key or os.environ.get(ENV_VAR)
    if args.api_key_file:
        app_args.update(api_key_file=os.path.abspath(args.api_key_file), require_api_key=True)
        return None
    if not key:
        if not app_args.get("require_api_key"):
            print("softwatch serve: no API key: every route is open to anyone who reaches "
                  "the service (give --api-key-file or $SOFTWATCH_API_KEY)", file=sys.stderr, flush=True)
        return None
    key_dir = tempfile.TemporaryDirectory(prefix="softwatch-key-")  # mode 0700
    path = os.path.join(key_dir.name, "api-key")
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(key)
    app_args.update(api_key_file=path, require_api_key=True)
    return key_dir


def _demo(args) -> int:
    from .demo import DemoOptions, run

    if args.requests < 40 or args.concurrency < 1 or args.max_tokens < 1:
        raise ValueError("--requests must be >= 40 (20 per side), --concurrency and --max-tokens >= 1")
    return run(DemoOptions(model=args.model, engine=args.engine, data=args.data, requests=args.requests, concurrency=args.concurrency,
                           max_tokens=args.max_tokens, port=args.port, keep_running=args.keep_running))


if __name__ == "__main__":
    sys.exit(main())
