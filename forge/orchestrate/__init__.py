"""Plans and runs step graphs: the scheduler, variants, method: auto and the build-to-record pipeline.
May import everything below the CLI.
"""
