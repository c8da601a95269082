"""The demo world: a small synthetic web of captioned shapes that stands in for
the paper's crawl in the demo and the tests, served over HTTP with a real
crawl's faults. A fixture world, not part of the data pipeline (dalle_core.data).
"""
