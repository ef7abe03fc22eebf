# Two entry points; both run scripts/setup.sh first, which is quick once done.
.PHONY: run test

# Set up (all three models prepared once), then serve the app.
run:
	bash scripts/setup.sh app
	.venv/bin/python -m streamlit run app/main.py

# Set up (SmolLM2 prepared, chromium for the browser test), then run every test.
test:
	bash scripts/setup.sh test
	.venv/bin/python -m pytest -q
