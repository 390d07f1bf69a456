"""kvmtrace: eBPF tracing and measurement of KVM's MMU-notifier hva path and memslot updates."""

__version__ = "0.1.0"
