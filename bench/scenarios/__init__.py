"""One module per scenario, each exposing ``run(ctx) -> ScenarioResult``."""
