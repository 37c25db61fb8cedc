"""slm_assist: cheaper LLM pretraining with a small LM. The layers, lowest first (docs/ARCHITECTURE.md):

core (shared infrastructure, artifact openers) <- data_tools <- training (the one loop) <- kd (building blocks)
<- salt (recipe) <- the commands: train, eval, report, hub.
"""
