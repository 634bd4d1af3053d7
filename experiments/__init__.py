"""Research scripts: measurements and comparisons behind docs/method.md. Not part of the product packages."""
