#!/usr/bin/env python3
"""Writes the Debian copyright file of the byok_pg package (scripts/package.sh).

byok_pg.so links every Rust crate it uses statically, so the package carries
their licenses: byok_pg's own stanza (Apache-2.0, in Debian's common-licenses),
then one stanza per crate compiled into the library (from `cargo tree`: normal
dependencies of the target, no build scripts, no procedural macros, which run
at build time only), with its authors and license expression from its
Cargo.toml, then the license and notice files those crates ship. Identical
texts are printed once, with the crates they cover; copies of the Apache-2.0
text are replaced by a pointer to /usr/share/common-licenses/Apache-2.0.

Usage: package-copyright.py FEATURES OUTPUT   (run from the workspace root)
"""

import hashlib
import json
import os
import re
import subprocess
import sys

COMMON_APACHE = "/usr/share/common-licenses/Apache-2.0"
LICENSE_FILE = re.compile(r"^(LICEN[CS]E|COPYING|NOTICE|UNLICENSE)", re.IGNORECASE)


def run(*args):
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def linked_crates(features):
    """(name, version) of every crate compiled into byok_pg.so."""
    out = run(
        "cargo", "tree", "-p", "byok_pg", "--features", features,
        "-e", "normal,no-proc-macro", "--prefix", "none", "-f", "{p}",
    )
    crates = set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].startswith("v"):
            crates.add((parts[0], parts[1][1:]))
    return crates


def normalized(text):
    return " ".join(text.split())


APACHE_START = re.compile(r"Apache License\s+Version 2\.0, January 2004")
# The license proper ends with its section 9; "END OF TERMS AND CONDITIONS" and
# the appendix (a template, sometimes filled in) may follow.
APACHE_END = re.compile(r"accepting any such warranty or additional liability\.(\s*END OF TERMS AND CONDITIONS)?")
APPENDIX = re.compile(r"\s*APPENDIX: How to apply the Apache License to your work\..*?"
                      r"limitations under the License\.", re.DOTALL)


def without_apache_text(text):
    """The text with any full copy of the Apache License 2.0 replaced by a pointer
    to Debian's copy (policy 12.5), a blank appendix template dropped."""
    while (start := APACHE_START.search(text)) and (end := APACHE_END.search(text, start.end())):
        rest = text[end.end():]
        appendix = APPENDIX.match(rest)
        if appendix and "[yyyy]" in appendix.group(0):
            rest = rest[appendix.end():]
        text = (text[:start.start()].rstrip() + "\n[The Apache License 2.0: " + COMMON_APACHE + "]\n"
                + rest.lstrip("\n"))
    return text.strip("\n")


def mit_permission_text():
    """The MIT license's permission notice, from the Rust toolchain's copy."""
    sysroot = run("rustc", "--print", "sysroot").strip()
    with open(os.path.join(sysroot, "share/doc/rust/licenses/MIT.txt"), encoding="utf-8") as fh:
        text = fh.read()
    return text[text.index("Permission is hereby granted"):].strip("\n")


def main():
    features, output = sys.argv[1], sys.argv[2]
    wanted = linked_crates(features)
    meta = json.loads(run("cargo", "metadata", "--format-version", "1", "--features", features))
    packages = {(p["name"], p["version"]): p for p in meta["packages"]}
    missing = wanted - packages.keys()
    if missing:
        sys.exit(f"cargo metadata does not know {sorted(missing)}")

    stanzas, texts, unlicensed_files = [], {}, []
    for name, version in sorted(wanted):
        pkg = packages[(name, version)]
        if pkg.get("source") is None:
            continue  # byok_pg's own crates: the first stanza
        license_expr = pkg.get("license") or "see its license file below"
        authors = "; ".join(pkg.get("authors") or []) or "the crate's authors (no authors field)"
        stanzas.append(
            f"Files: statically linked crate {name} {version}\n"
            f"Copyright: {authors}\n"
            f"License: {license_expr}\n"
        )
        directory = os.path.dirname(pkg["manifest_path"])
        files = sorted(f for f in os.listdir(directory) if LICENSE_FILE.match(f)
                       and os.path.isfile(os.path.join(directory, f)))
        if not files:
            unlicensed_files.append(f"{name} {version}")
            if "MIT" in license_expr.replace("MIT-0", ""):
                # No file to copy: the MIT notice, with the crate's authors as holders.
                text = f"Copyright (c) {authors}\n\n{mit_permission_text()}"
                texts.setdefault(hashlib.sha256(text.encode()).hexdigest(),
                                 {"text": text, "crates": []})["crates"].append(
                    f"{name} {version} (MIT notice from its Cargo.toml)")
        for f in files:
            with open(os.path.join(directory, f), encoding="utf-8", errors="replace") as fh:
                text = fh.read().strip("\n")
            text = without_apache_text(text)
            if text.startswith("[The Apache License 2.0: ") and text.count("\n") == 0:
                continue  # nothing but the standard text: the License paragraph covers it
            key = hashlib.sha256(normalized(text).encode()).hexdigest()
            entry = texts.setdefault(key, {"text": text, "crates": []})
            entry["crates"].append(f"{name} {version} ({f})")

    with open(output, "w", encoding="utf-8") as out:
        out.write(
            "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"
            "Upstream-Name: byok_pg\n"
            "Comment: byok_pg.so is a Rust library that links the crates below\n"
            " statically; their license and notice files follow their stanzas.\n"
            "\n"
            "Files: *\n"
            "Copyright: the byok_pg developers\n"
            "License: Apache-2.0\n"
            "\n"
            "Files: the Rust standard library (std, core, alloc and the crates they bundle)\n"
            "Copyright: The Rust Project Developers\n"
            "License: MIT OR Apache-2.0\n"
            "Comment: linked statically. The notices of the standard library's own\n"
            " dependencies are in rust-std-COPYRIGHT-library.html.gz beside this file\n"
            " (the toolchain's share/doc/rust/COPYRIGHT-library.html).\n"
            "\n"
            "Files: pgrx-pg-sys (bindings generated from PostgreSQL's server headers)\n"
            "Copyright: The PostgreSQL Global Development Group;\n"
            " The Regents of the University of California\n"
            "License: PostgreSQL\n"
            "Comment: the PostgreSQL License's text is in\n"
            " /usr/share/doc/postgresql-15/copyright (this package depends on postgresql-15).\n"
            "\n"
        )
        for stanza in stanzas:
            out.write(stanza + "\n")
        out.write(
            "License: Apache-2.0\n"
            f" The full text of the Apache License 2.0 is in {COMMON_APACHE}.\n"
            " Where a crate above ships the standard text unchanged, it is not\n"
            " repeated here.\n"
        )
        if unlicensed_files:
            out.write(
                "Comment: these crates ship no license file; their license is the\n"
                " expression in their stanza, and for MIT the notice below names their\n"
                " authors: " + ", ".join(unlicensed_files) + ".\n"
            )
        for entry in sorted(texts.values(), key=lambda e: e["crates"][0]):
            out.write("\nComment: license text of " + ", ".join(entry["crates"]) + "\n .\n")
            for line in entry["text"].splitlines():
                out.write(" " + line.rstrip() + "\n" if line.strip() else " .\n")
    print(f"{len(stanzas)} crates, {len(texts)} distinct license texts -> {output}")


if __name__ == "__main__":
    main()
