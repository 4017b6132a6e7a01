#!/usr/bin/env python3
"""Builds a Tally OCI image archive without Docker, reproducibly.

The image holds one binary (debug sections stripped), the shared libraries it links as this
machine resolves them, the CA bundle, and passwd/group entries for the unprivileged user 65532.
Everything that could vary between two builds of the same inputs is fixed: file order, owners,
modes, timestamps (SOURCE_DATE_EPOCH, default 0), gzip headers. Two builds of the same binary on
the same machine give the same digest.

    oci_image.py --binary target/release/tally-sidecar --ref ghcr.io/tally-dev/tally-sidecar:0.1.0 \\
        --out tally-sidecar.tar
    oci_image.py --binary ... --rootfs DIR     # only the file tree (for the Containerfile)

The archive is an OCI image layout in a tar (`oci-archive:` for skopeo, `kind load image-archive`,
`ctr images import`). Standard library only.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

USER = 65532
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
SOURCE = "https://github.com/tally-dev/tally"


def shared_libraries(binary):
    """The absolute paths ldd resolves for `binary`, the dynamic loader included; none for a static one."""
    ldd = subprocess.run(["ldd", binary], capture_output=True, text=True)
    if "not a dynamic executable" in ldd.stdout + ldd.stderr:
        return []
    if ldd.returncode != 0:
        sys.exit(f"error: ldd {binary} failed:\n{ldd.stdout}{ldd.stderr}")
    out = ldd.stdout
    paths = set()
    for line in out.splitlines():
        words = line.split()
        if "=>" in words:
            target = words[words.index("=>") + 1]
            if target.startswith("/"):
                paths.add(target)
        elif words and words[0].startswith("/"):
            paths.add(words[0])
    missing = [p for p in paths if not os.path.exists(p)]
    if "not found" in out or missing:
        sys.exit(f"error: {binary} links libraries this machine lacks:\n{out}")
    return sorted(paths)


def stage_rootfs(binary, root):
    """Lays out the image's files under `root`; returns the entrypoint."""
    name = os.path.basename(binary)
    entrypoint = f"/usr/bin/{name}"
    os.makedirs(os.path.join(root, "usr/bin"))
    staged = os.path.join(root, entrypoint.lstrip("/"))
    # Debug sections only: symbols stay, so a crash report still names functions.
    subprocess.run(["objcopy", "--strip-debug", binary, staged], check=True)
    os.chmod(staged, 0o755)
    for lib in shared_libraries(binary):
        dest = os.path.join(root, lib.lstrip("/"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(os.path.realpath(lib), dest)
        os.chmod(dest, 0o755)
    ca = os.path.join(root, CA_BUNDLE.lstrip("/"))
    os.makedirs(os.path.dirname(ca))
    shutil.copyfile(CA_BUNDLE, ca)
    with open(os.path.join(root, "etc/passwd"), "w") as f:
        f.write(f"root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:{USER}:{USER}:nonroot:/home/nonroot:/sbin/nologin\n")
    with open(os.path.join(root, "etc/group"), "w") as f:
        f.write(f"root:x:0:\nnonroot:x:{USER}:\n")
    # The home directory the passwd entry names; the rest of the filesystem may be read-only.
    os.makedirs(os.path.join(root, "home/nonroot"))
    return entrypoint


def layer(root, epoch):
    """The uncompressed and gzip-compressed tar of `root`, byte for byte the same every time."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        entries = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in dirnames + sorted(filenames):
                entries.append(os.path.join(dirpath, name))
        for full in sorted(entries, key=lambda p: os.path.relpath(p, root)):
            rel = os.path.relpath(full, root)
            info = tar.gettarinfo(full, rel)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = epoch
            if info.isdir():
                info.mode = 0o755
                if rel == "home/nonroot":
                    info.uid = info.gid = USER
                tar.addfile(info)
            else:
                info.mode = 0o755 if os.access(full, os.X_OK) else 0o644
                with open(full, "rb") as f:
                    tar.addfile(info, f)
    diff = raw.getvalue()
    compressed = io.BytesIO()
    with gzip.GzipFile(fileobj=compressed, mode="wb", compresslevel=9, mtime=0, filename="") as gz:
        gz.write(diff)
    return diff, compressed.getvalue()


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical(value):
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def image(binary, ref, epoch):
    """(blobs by digest, the index, the manifest digest, the compressed layer size)."""
    with tempfile.TemporaryDirectory(prefix="tally-rootfs-") as root:
        entrypoint = stage_rootfs(binary, root)
        diff, compressed = layer(root, epoch)
    repository, _, tag = ref.rpartition(":")
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
    labels = {
        "org.opencontainers.image.source": SOURCE,
        "org.opencontainers.image.title": os.path.basename(binary),
        "org.opencontainers.image.version": tag,
    }
    config = canonical({
        "architecture": "amd64",
        "os": "linux",
        "created": created,
        "config": {
            "User": f"{USER}:{USER}",
            "Entrypoint": [entrypoint],
            "Env": [
                "PATH=/usr/bin:/bin",
                f"SSL_CERT_FILE={CA_BUNDLE}",
            ],
            "WorkingDir": "/",
            "Labels": labels,
        },
        "rootfs": {"type": "layers", "diff_ids": [sha256(diff)]},
        "history": [{"created": created, "created_by": "images/oci_image.py"}],
    })
    manifest = canonical({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha256(config),
            "size": len(config),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": sha256(compressed),
            "size": len(compressed),
        }],
        "annotations": labels,
    })
    index = canonical({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sha256(manifest),
            "size": len(manifest),
            "annotations": {
                # containerd (`ctr images import`, `kind load image-archive`) names the image
                # from the first; skopeo and the OCI layout spec look at the second.
                "io.containerd.image.name": ref,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    })
    blobs = {sha256(b): b for b in (compressed, config, manifest)}
    return blobs, index, sha256(manifest), len(compressed)


def write_archive(out, blobs, index, epoch):
    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = epoch
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(data))

    tmp = out + ".partial"
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        add(tar, "oci-layout", canonical({"imageLayoutVersion": "1.0.0"}))
        add(tar, "index.json", index)
        for digest in sorted(blobs):
            add(tar, "blobs/sha256/" + digest.split(":", 1)[1], blobs[digest])
    os.replace(tmp, out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", required=True, help="the executable to ship")
    parser.add_argument("--ref", help="image reference, e.g. ghcr.io/tally-dev/tally-sidecar:0.1.0")
    parser.add_argument("--out", help="the archive to write")
    parser.add_argument("--rootfs", help="only lay out the file tree in this (new) directory")
    args = parser.parse_args()
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    if args.rootfs:
        os.makedirs(args.rootfs)
        print(stage_rootfs(args.binary, args.rootfs))
        return
    if not args.ref or not args.out or ":" not in args.ref.rsplit("/", 1)[-1]:
        parser.error("--ref <repository>:<tag> and --out are required (or --rootfs)")
    blobs, index, digest, layer_size = image(args.binary, args.ref, epoch)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_archive(args.out, blobs, index, epoch)
    print(json.dumps({"ref": args.ref, "archive": args.out, "digest": digest, "compressedBytes": layer_size}))


if __name__ == "__main__":
    main()
