"""Shared infrastructure: config, errors, atomic files, process group and device, fault hooks, and one module per
on-disk artifact (tokenizer, packed dataset, model directory, scores + soft-label cache, selection index) that is
the only place opening it and checking its identity. Imports nothing else of ours."""
