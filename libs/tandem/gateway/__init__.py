"""The gateway's library side: `requests` turns a tandem.v1.GenerateRequest into engine inputs (or a
RequestError naming the bad field) and `stream` turns generated token ids into text with stop strings. The
gRPC servicer and the `tandem serve gateway` process live in services/gateway/.
"""
