"""The `tandem` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from services import add_serve_parser
from tandem.cluster.launcher import add_up_parser
from tandem.eplb.cli import add_eplb_parser
from tandem.train.cli import add_train_parser

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _add_generation_flags(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs the model's tokenizer.json)")
    src.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); not included in the output")
    p.add_argument("--stop-token-ids", default="", help="comma-separated token ids that end generation")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    p.add_argument("--no-token-healing", action="store_true",
                   help="take a --prompt's last token as it is; by default a prompt that ends inside what would be one "
                        "token (e.g. a trailing space) is backed up by that token and the first generated token "
                        "must start with its text")
    p.add_argument("--speculative-tokens", type=int, default=None,
                   help="MTP drafts per step at most (default: the model's MTP depth; 0 = no speculation)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tandem", description="Tandem: disaggregated inference for DeepSeek-V3-architecture MoE models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate text, in-process or from a running cluster",
                         description="Generate from a prompt and stream the text, or print JSON with --json: with "
                                     "--model, with the colocated engine in this process; with --gateway, from a "
                                     "running cluster (`tandem up`).")
    where = gen.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", help="Hugging Face-layout checkpoint directory (run the engine in-process)")
    where.add_argument("--gateway", metavar="HOST:PORT", help="a running gateway to send the request to")
    gen.add_argument("--timeout-s", type=float, default=None,
                     help="with --gateway: the request's deadline in seconds (default none)")
    _add_generation_flags(gen)
    # unset (None) so that --gateway can tell they were given: they are the engine's settings, not a request's
    gen.add_argument("--dtype", choices=sorted(DTYPES), help="compute dtype (default float32)")
    gen.add_argument("--device", choices=["cpu", "cuda"], help="where to run (default cpu)")
    gen.add_argument("--mtp-input", choices=["post_norm", "pre_norm"],
                     help="hidden state fed to the first MTP module (default post_norm, as vLLM/SGLang do)")
    gen.add_argument("--no-adaptive-speculation", action="store_true",
                     help="always draft --speculative-tokens tokens instead of choosing per step")
    gen.add_argument("--no-cuda-graphs", action="store_true",
                     help="with --device cuda: run every decode step eagerly instead of replaying it from a CUDA "
                          "graph (graphs need bfloat16)")
    gen.add_argument("--compile", action="store_true",
                     help="with --device cpu: run decode steps from forwards compiled ahead of time (AOTInductor), "
                          "about 2.5x faster at batch 1, compiled before the first token (15-30 s per class of shapes "
                          "on 2 cores, about 50 s in bfloat16 on a CPU with AMX; cached on disk for the next run)")
    gen.set_defaults(func=_cmd_generate)

    init = sub.add_parser("init-model", help="write a random-weight checkpoint of a named shape",
                          description="Write a random-weight DeepSeek-V3-architecture checkpoint (and a byte-level "
                                      "BPE tokenizer trained on a slice of Python's standard library) for demos "
                                      "and benchmarks. Its text is noise: a trained model makes sense.")
    init.add_argument("--out", required=True, help="directory to write")
    init.add_argument("--preset", default="tiny", help="shape: tiny or moonlight (default tiny)")
    init.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    init.set_defaults(func=_cmd_init_model)

    quant = sub.add_parser("quantize", help="write an FP8 copy of a checkpoint in DeepSeek's format",
                           description="Copy a checkpoint with every decoder-layer Linear weight in float8_e4m3fn "
                                       "with a float32 scale per 128x128 block (`*.weight_scale_inv`), as DeepSeek "
                                       "ships V3; embeddings, heads and router weights in --matrix-dtype, norms and "
                                       "biases as stored. Tandem dequantises at load.")
    quant.add_argument("model", help="source checkpoint directory")
    quant.add_argument("--out", required=True, help="directory to write")
    quant.add_argument("--matrix-dtype", choices=sorted(DTYPES), default="bfloat16",
                       help="dtype of the unquantised matrices (default bfloat16)")
    quant.set_defaults(func=_cmd_quantize)

    health = sub.add_parser("health", help="ask a service whether it is SERVING",
                            description="Query the grpc.health.v1 service of a Tandem service (any of them); exit "
                                        "code 0 when it is SERVING, 1 otherwise (container health checks use it).")
    health.add_argument("address", metavar="HOST:PORT", help="the service's gRPC address")
    health.add_argument("--timeout-s", type=float, default=3.0, help="how long to wait for an answer (default 3)")
    health.set_defaults(func=_cmd_health)
    add_train_parser(sub)
    add_serve_parser(sub)
    add_up_parser(sub)
    add_eplb_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from tandem.engine.sampling import SamplingError
    from tandem.model.checkpoint import CheckpointError
    from tandem.model.config import ConfigError
    try:
        return args.func(args)
    except (SamplingError, CheckpointError, ConfigError, ValueError) as e:
        print(f"tandem {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parse_ids(text: str, flag: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from None


def _sampling_params(args: argparse.Namespace):
    from tandem.engine.sampling import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop=tuple(args.stop),
                          stop_token_ids=tuple(_parse_ids(args.stop_token_ids, "--stop-token-ids")),
                          ignore_eos=args.ignore_eos)


def _cmd_generate(args: argparse.Namespace) -> int:
    if args.gateway is not None:
        return _generate_remote(args)
    from tandem.engine.engine import Engine, EngineConfig
    from tandem.engine.token_healing import TokenHealer
    from tandem.model.config import ModelConfig
    from tandem.model.loading import load_model
    from tandem.model.tokenizer import load_tokenizer

    dtype, device, mtp_input = args.dtype or "float32", args.device or "cpu", args.mtp_input or "post_norm"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    params = _sampling_params(args)
    if not Path(args.model).is_dir():
        raise ValueError(f"--model {args.model}: no such directory")
    tokenizer = load_tokenizer(args.model)
    if args.prompt is not None:
        if tokenizer is None:
            raise ValueError(f"--prompt needs {args.model}/tokenizer.json; pass --prompt-ids instead")
        prompt_ids = tokenizer.encode(args.prompt).ids
        if not args.no_token_healing:
            healed = TokenHealer(tokenizer).heal(prompt_ids)
            prompt_ids, params = healed.prompt_ids, healed.apply(params)
    else:
        prompt_ids = _parse_ids(args.prompt_ids, "--prompt-ids")
    mtp_depth = ModelConfig.from_file(args.model).num_nextn_predict_layers
    spec = mtp_depth if args.speculative_tokens is None else args.speculative_tokens
    if spec < 0:
        raise ValueError(f"--speculative-tokens must be >= 0, got {spec}")
    model = load_model(args.model, dtype=DTYPES[dtype], device=device, mtp_input=mtp_input,
                       show_progress=not args.json)
    if args.compile and device == "cpu" and not args.json:
        print("tandem generate: --compile: compiling the decode steps first (15-60 s per class of shapes, once)",
              file=sys.stderr)
    engine = Engine(model, EngineConfig(max_num_seqs=1, num_speculative_tokens=spec,
                                        adaptive_speculation=not args.no_adaptive_speculation,
                                        cuda_graphs=not args.no_cuda_graphs, compile_decode=args.compile),
                    tokenizer)
    request_id = engine.add_request(prompt_ids, params)
    token_ids, text, reason = [], "", None
    while engine.has_unfinished:
        for out in engine.step():
            token_ids += out.new_token_ids
            text += out.new_text
            reason = out.finish_reason or reason
            if not args.json:
                sys.stdout.write(out.new_text)
                sys.stdout.flush()
    if args.json:
        result = {"request_id": request_id, "prompt_token_ids": prompt_ids, "token_ids": token_ids, "text": text,
                  "finish_reason": reason}
        if spec:
            result["spec"] = engine.spec_totals.to_dict()
        print(json.dumps(result))
    else:
        sys.stdout.write("\n")
    return 0


def _generate_remote(args: argparse.Namespace) -> int:
    """`generate --gateway`: the same flags as a tandem.v1.GenerateRequest, streamed from the cluster."""
    import grpc

    from tandem.gateway.client import Completion, GatewayClient, speculative_field
    from tandem.v1 import gateway_pb2 as pb

    if args.stop_token_ids or args.ignore_eos:
        raise ValueError("--stop-token-ids and --ignore-eos are not part of the gateway's API; use --stop")
    for flag in ("dtype", "device", "mtp_input", "no_adaptive_speculation", "no_cuda_graphs", "compile"):
        if getattr(args, flag):
            raise ValueError(f"--{flag.replace('_', '-')} is a setting of the cluster's workers, not of a request")
    request = pb.GenerateRequest(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                 top_k=args.top_k, stop=args.stop,
                                 speculative_tokens=speculative_field(args.speculative_tokens),
                                 disable_token_healing=args.no_token_healing)
    if args.seed is not None:
        request.seed = args.seed
    if args.prompt is not None:
        request.prompt = args.prompt
    else:
        request.prompt_token_ids.extend(_parse_ids(args.prompt_ids, "--prompt-ids"))
    completion = Completion()
    try:
        with GatewayClient(args.gateway) as client:
            client.wait_ready(timeout_s=10.0)
            for response in client.stream(request, timeout_s=args.timeout_s):
                completion.add(response)
                if not args.json:
                    sys.stdout.write(response.text)
                    sys.stdout.flush()
    except ConnectionError as e:
        print(f"tandem generate: error: {e}", file=sys.stderr)
        return 1
    except grpc.RpcError as e:
        print(f"\ntandem generate: error: the gateway answered {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"request_id": completion.request_id, "token_ids": completion.token_ids,
                          "text": completion.text, "finish_reason": completion.finish_reason,
                          "usage": completion.usage}))
    else:
        sys.stdout.write("\n")
    return 0


def _cmd_health(args: argparse.Namespace) -> int:
    from grpc_health.v1 import health_pb2

    from tandem.cluster.launcher import health_status

    status = health_status(args.address, args.timeout_s)
    name = "NO ANSWER" if status is None else health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    print(f"{args.address}: {name}")
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1


def _cmd_quantize(args: argparse.Namespace) -> int:
    from tandem.model.checkpoint import quantize_checkpoint_fp8

    if not Path(args.model, "config.json").is_file():
        raise ValueError(f"{args.model}: no config.json there (a Hugging Face-layout checkpoint directory)")
    quantize_checkpoint_fp8(args.model, args.out, matrix_dtype=DTYPES[args.matrix_dtype])
    size = sum(f.stat().st_size for f in Path(args.out).iterdir() if f.is_file())
    print(f"wrote an FP8 copy of {args.model} to {args.out} ({size / 2**20:.1f} MiB)")
    return 0


def _cmd_init_model(args: argparse.Namespace) -> int:
    import sysconfig

    from tandem.model.checkpoint import save_checkpoint
    from tandem.model.loading import export_state_dict
    from tandem.model.presets import preset_config, random_model
    from tandem.train.tokenizer import train_tokenizer

    config = preset_config(args.preset)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sample_files = sorted(stdlib.glob("*.py"))[:40]
    tokenizer = train_tokenizer(sample_files, vocab_size=config.vocab_size)
    tokenizer.save(str(out / "tokenizer.json"))
    special = tokenizer.token_to_id("<|eos|>")
    from dataclasses import replace
    config = replace(config, bos_token_id=tokenizer.token_to_id("<|bos|>"), eos_token_id=(special,))
    model = random_model(config, seed=args.seed)
    save_checkpoint(out, config, export_state_dict(model))
    print(f"wrote a random-weight {args.preset} checkpoint to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
