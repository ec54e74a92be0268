"""Tandem's services: thin gRPC servers over libs/tandem, one package each, run as `tandem serve <name>`."""

from __future__ import annotations

import argparse


def add_serve_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`tandem serve <service>`: one subcommand per service, each with its config's flags."""
    from services.controller.server import add_controller_parser
    from services.decode.server import add_decode_parser
    from services.expert.server import add_expert_parser
    from services.gateway.server import add_gateway_parser
    from services.prefill.server import add_prefill_parser

    p = sub.add_parser("serve", help="run one cluster service", description="Run one service of the cluster.")
    services = p.add_subparsers(dest="service", required=True, metavar="SERVICE")
    add_controller_parser(services)
    add_expert_parser(services)
    add_prefill_parser(services)
    add_decode_parser(services)
    add_gateway_parser(services)
    return p
