"""AT Protocol primitives without I/O: syntax, DAG-CBOR, CAR, MST, crypto, DIDs, commits,
firehose frames, lexicon validation and labels. Nothing here imports the rest of psky."""
