"""mlxft studio: a local web app over the same library as the CLI.

    mlxft studio [--runs-dir runs] [--port 8321]

Serves on 127.0.0.1 and prints the URL to open (it carries this launch's token). Pages:
runs (live), a run (live curves, stop/resume, report, export), new run (recipe check and
memory plan before starting), data (`mlxft data check`), playground (base vs adapters on
`mlxft serve`'s engine), compare (two runs). app.py has the routes; security.py the rules.
"""
