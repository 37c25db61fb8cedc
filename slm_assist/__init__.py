"""slm_assist: cheaper LLM pretraining with a small LM. The layers, lowest first (docs/ARCHITECTURE.md):

core (shared infrastructure, artifact openers, the run directory's owner) <- data_tools (corpus, pack, score,
select) and training (the one loop), independent of each other <- kd (building blocks) <- the recipes: salt
(pretraining with an SLM) and compress (progressive distillation into a student, with its own command
`python -m slm_assist.compress`) <- recipes (the table of both) <- the commands: train, eval, report, hub.
"""
