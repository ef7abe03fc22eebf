"""``python -m lab serve-bench``: load a real serving engine at rising concurrency (``lab.studies.serve_bench``)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from lab.cli.common import EXIT_OK, UsageError, add_save_argument, finish_saved, holding_device, log_line, run_saver


def add_serve_bench(commands) -> None:
    """Register ``python -m lab serve-bench``."""
    serve = commands.add_parser("serve-bench", help="load a real serving engine (vLLM, SGLang, llama.cpp) at rising "
                                "concurrency, speculation on and off")
    serve.add_argument("--on", metavar="URL", help="the endpoint with speculation on, e.g. http://127.0.0.1:8080")
    serve.add_argument("--off", metavar="URL", help="the same model with speculation off (omit to measure one endpoint)")
    serve.add_argument("--model", help="model name to send (default: the first one each server lists at /v1/models)")
    serve.add_argument("--api", choices=("completions", "chat"), default="completions",
                       help="/v1/completions with the raw prompt, or /v1/chat/completions (default completions)")
    serve.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated levels (default 1,2,4,8,16)")
    serve.add_argument("--prompts", nargs="+", default=["spec_bench:mix:8"],
                       help="prompt sets, as for bench (default: spec_bench:mix:8, which needs the Spec-Bench file)")
    serve.add_argument("--n", type=int, default=None, help="use the first N prompts of the sets")
    serve.add_argument("--max-tokens", type=int, default=32, help="output tokens per request (default 32)")
    serve.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    serve.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at EOS (default: ask for all max tokens)")
    serve.add_argument("--rounds", type=int, default=2, help="requests per concurrent worker per level (default 2)")
    serve.add_argument("--max-level-s", type=float, default=300.0, help="no request starts later than this into a level (default 300)")
    serve.add_argument("--timeout-s", type=float, default=120.0, help="per-request timeout (default 120)")
    serve.add_argument("--lab-target", help="also run the lab's own engine on the same prompts with this target (a preset)")
    serve.add_argument("--lab-draft", help="... and this draft model (a preset), for the side-by-side comparison")
    serve.add_argument("--lab-k", type=int, default=4, help="K for the lab's own engine (default 4; match --draft-max)")
    serve.add_argument("--llama-target", metavar="PRESET",
                       help="instead of --on/--off: start two llama-servers on 127.0.0.1 serving this preset's GGUF, "
                       "one drafted by --llama-draft (on) and one alone (off); needs scripts/build_llama_server.sh")
    serve.add_argument("--llama-draft", metavar="PRESET", help="the draft preset of the 'on' llama-server")
    serve.add_argument("--llama-k", type=int, default=4, help="tokens drafted per step by llama-server (default 4)")
    serve.add_argument("--llama-parallel", type=int, default=None,
                       help="llama-server slots (default: the largest concurrency level)")
    serve.add_argument("--llama-threads", type=int, default=2, help="llama-server CPU threads (default 2)")
    serve.add_argument("--json", action="store_true", help="print the JSON result instead of the table")
    serve.add_argument("--out", type=Path, help="also write the JSON result (with per-request records) to this file")
    serve.add_argument("--csv", type=Path, help="also write one CSV row per endpoint and level to this file")
    add_save_argument(serve)
    serve.set_defaults(handler=_cmd_serve_bench)


def _cmd_serve_bench(args: argparse.Namespace) -> int:
    from lab.prompts import load_prompt_sets
    from lab.studies.serve_bench import format_serve_bench, run_serve_bench
    from lab.studies.serve_reference import run_lab_reference
    from lab.serving.client import Endpoint, RequestSettings
    from lab.serving.urls import URLError, check_url, is_local_url

    for flag, url in (("--on", args.on), ("--off", args.off)):
        if url is not None:
            try:
                check_url(url)
            except URLError as error:
                raise UsageError(f"{flag}: {error}") from None
    if args.n is not None and args.n < 1:
        raise UsageError(f"--n requires a number of prompts >= 1; got {args.n}")
    try:
        levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        raise UsageError(f"--concurrency requires comma-separated integers, e.g. 1,2,4,8; got {args.concurrency!r}") from None
    if not levels or min(levels) < 1:
        raise UsageError(f"--concurrency requires integers >= 1; got {args.concurrency!r}")
    if bool(args.lab_target) != bool(args.lab_draft):
        raise UsageError("the lab comparison requires both --lab-target and --lab-draft (e.g. qwen2.5-coder-1.5b "
                         "and qwen2.5-coder-0.5b)")
    launch = args.llama_target is not None
    if launch == bool(args.on) or (launch and args.off):
        raise UsageError("serve-bench requires either --on URL [--off URL] or --llama-target PRESET --llama-draft PRESET")
    if launch and not args.llama_draft:
        raise UsageError("--llama-target requires --llama-draft PRESET (e.g. qwen2.5-coder-0.5b)")
    if args.lab_target and not (args.off or launch):
        raise UsageError("the lab comparison requires --off URL too (the engine's speedup needs speculation off)")
    settings = RequestSettings(max_tokens=args.max_tokens, temperature=args.temperature,
                               ignore_eos=not args.no_ignore_eos, timeout_s=args.timeout_s)
    prompts = load_prompt_sets(args.prompts)[: args.n]
    if not prompts:
        raise UsageError(f"the prompt sets {' '.join(args.prompts)} hold no prompts: choose others")
    # llama-server started here, the lab's own reference engine, or a server on this machine share its cores:
    # hold the CPU in lab.device_queue, as every timed run of the lab does
    local = launch or bool(args.lab_target) or any(is_local_url(u) for u in (args.on, args.off) if u)
    with holding_device("cpu", "serve-bench", watch_load=False) if local else contextlib.nullcontext():
        with contextlib.ExitStack() as servers:
            if launch:
                on_url, off_url = _start_llama_servers(args, max(levels), servers)
            else:
                on_url, off_url = args.on, args.off
            endpoints = [Endpoint(on_url, args.model, args.api, "on")]
            if off_url:
                endpoints.append(Endpoint(off_url, args.model, args.api, "off"))
            bench = run_serve_bench(endpoints, prompts, levels, settings, rounds=args.rounds,
                                    max_level_s=args.max_level_s, progress=log_line)
            if launch:
                bench.settings["llama_server"] = {"target": args.llama_target, "draft": args.llama_draft,
                                                  "k": args.llama_k, "parallel": args.llama_parallel or max(levels),
                                                  "threads": args.llama_threads, "llama_cpp_python": _llama_version()}
        if args.lab_target:
            bench.lab = run_lab_reference(args.lab_target, args.lab_draft, prompts, args.lab_k, args.max_tokens,
                                          chat_template=args.api == "chat", progress=log_line)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(bench.to_json())
        print(f"wrote {args.out}", file=sys.stderr)
    if args.csv is not None:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        args.csv.write_text(bench.to_csv())
        print(f"wrote {args.csv}", file=sys.stderr)
    from lab.figures import from_serve_bench

    data = bench.as_dict()
    saver = run_saver(args, "serve", target=args.llama_target or args.model, draft=args.llama_draft,
                      settings=data["settings"])
    finish_saved(saver, from_serve_bench(data), payload=data, status="partial" if bench.stopped else "complete")
    print(bench.to_json(requests=False) if args.json else format_serve_bench(bench))
    return EXIT_OK


def _start_llama_servers(args: argparse.Namespace, max_level: int, stack: contextlib.ExitStack) -> tuple[str, str]:
    """Start llama-server twice on 127.0.0.1 (target + draft: on; target alone: off); stopped when ``stack`` closes."""
    from lab.serving.llama_server import LlamaServer, gguf_path

    target, draft = gguf_path(args.llama_target), gguf_path(args.llama_draft)
    parallel = args.llama_parallel or max_level
    urls = []
    for label, draft_file in (("on", draft), ("off", None)):
        log_line(0.0, f"starting llama-server ({label}): {target.name}" + (f" drafted by {draft.name}" if draft_file else ""))
        server = LlamaServer(target, draft_file, draft_max=args.llama_k, parallel=parallel,
                             threads=args.llama_threads, alias=args.llama_target)
        stack.enter_context(server)
        urls.append(server.url)
    return urls[0], urls[1]


def _llama_version() -> str:
    from lab.serving.llama_server import LLAMA_CPP_PYTHON_VERSION

    return LLAMA_CPP_PYTHON_VERSION
