"""The UI's pages, one module each; ``ui/app.py`` routes between them.

Not named ``pages/``: Streamlit would take a ``pages/`` folder beside ``app.py`` for its older
multipage layout and run the app through it.
"""
