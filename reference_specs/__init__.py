"""The truth about formats, rules, causes and architectures. No I/O lives here."""
