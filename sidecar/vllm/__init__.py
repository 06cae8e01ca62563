"""Everything the daemon does with vLLM servers: the stage, the HTTP client, discovery, snapshots, ART names."""
