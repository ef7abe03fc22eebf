"""The Streamlit face of the lab: ``streamlit run app/main.py``. Imports ``lab``; ``lab`` never imports it."""
