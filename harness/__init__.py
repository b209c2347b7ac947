"""What the launcher, eval_bpb.py, boundaries.py, bench/ and tests/ share (never the trainers,
which stay self-contained files):

    harness.modules   import a repository file by path; studies, their runs.json and run envs
    harness.files     atomic writes, markdown tables, artifact payloads, logs without the source
    harness.runs      export a corpus, count its tokens, train one run in-process and summarise it
"""
