"""gRPC plumbing shared by the services.

The control plane's protos live in `protos/tandem/v1/*.proto`. Their Python code is generated, never
written or committed by hand: `python -m tandem.rpc.codegen` (run by `make install` after `pip install -e .`)
writes the package `tandem.v1` into `libs/tandem/v1/` (`*_pb2.py` messages, `*_pb2_grpc.py` stubs and
servicers, `*_pb2.pyi` type stubs), which git ignores. It regenerates only when a proto is newer than its
outputs, so running it again is cheap; after editing a proto, `make install` (or the command above) brings
the generated code up to date.

    from tandem.v1 import gateway_pb2, gateway_pb2_grpc
"""
