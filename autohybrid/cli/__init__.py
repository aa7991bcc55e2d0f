"""The ``autohybrid`` command: one module per subcommand, no logic beyond parse-and-call."""
