"""What the tests share: tiny models and pipelines, tiny training arguments, the local Hub servers and the
kill -9 runner. Test modules import from here, never from one another."""
