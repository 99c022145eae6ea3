"""Run hwft's conformance suite against this plugin's backend unless told otherwise."""


def pytest_configure(config):
    if not config.getoption("hwft_backend"):
        config.option.hwft_backend = ["template"]
