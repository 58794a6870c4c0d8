"""The UI as an ASGI app: Streamlit's own (``ui/app.py``) with the UI's middleware around it.

``python -m ui`` runs this file with ``streamlit run``, which finds ``app`` here and serves it
through uvicorn with the options given on its command line, as it would serve ``ui/app.py``.
"""

from pathlib import Path

from starlette.middleware import Middleware
from streamlit.starlette import App

from ui.security import SecurityMiddleware

app = App(Path(__file__).resolve().parent / "app.py", middleware=[Middleware(SecurityMiddleware)])
