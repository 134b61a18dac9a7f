"""The attention explorer: a Gradio app that calls the translation service and draws attention."""
