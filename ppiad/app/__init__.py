"""The inspection web app and JSON API (`ppiad serve`): inspection.py is the model-facing service, server.py
the FastAPI + Gradio server over it."""
