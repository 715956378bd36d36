.PHONY: app test setup

# Set everything up and start the labeling app (embedded SQLite store, demo images if empty).
app:
	.ci/app.sh

# Set everything up and run the whole test suite (PostgreSQL and Chromium included).
test:
	.ci/test.sh $(ARGS)

setup:
	.ci/setup-venv.sh
