"""`tandem serve prefill`: prompt processing and the KV handoff to a decode worker."""
