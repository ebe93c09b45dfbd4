// What every fuzz driver shares (tests/emu_fuzz/ generates the cases and checks the outputs
// against the Rust CPU reference). A driver is one small file per kernel file,
// scripts/emu/fuzz/<stem>.cpp: it includes this header (which includes harness.h and so
// kernels/<stem>.cu), and defines
//
//   void run_case(In& in, Out& out);
//
// which reads one case's fields in the order tests/emu_fuzz/<stem>.rs writes them, launches the
// kernels under emulation, and writes the outputs in the order the Rust side reads them. Every
// field carries its name, so a driver and a harness that drift apart fail with both names instead
// of misreading bytes.
//
// Wire format (little-endian; the same for cases and outputs): per case the item "case" (8 bytes:
// its index), then items, then the item "end". An item is a 1-byte name length, the name, an
// 8-byte payload length and the payload. Arrays carry their element offset first (a view that
// starts at that element of a 256-byte aligned allocation, as the device allocator aligns).
//
//   driver CASES OUTPUTS
#pragma once
#include "harness.h"

#include <string>

struct In {
    FILE* f;
    std::string name;
    std::vector<uint8_t> payload;
    explicit In(const char* path) : f(fopen(path, "rb")) {
        if (!f) { fprintf(stderr, "fuzz driver: cannot open %s\n", path); exit(2); }
    }
    // Reads the next item; false at the end of the file.
    bool item() {
        int len = fgetc(f);
        if (len == EOF) return false;
        name.assign((size_t)len, '\0');
        uint64_t n = 0;
        if (fread(name.data(), 1, (size_t)len, f) != (size_t)len || fread(&n, 8, 1, f) != 1) bad("truncated item");
        payload.resize(n);
        if (n && fread(payload.data(), 1, n, f) != n) bad("truncated payload");
        return true;
    }
    [[noreturn]] void bad(const std::string& what) {
        fprintf(stderr, "fuzz driver: %s (at item '%s')\n", what.c_str(), name.c_str());
        exit(3);
    }
    void expect(const char* want, size_t bytes) {
        if (!item()) bad(std::string("end of file, expected item '") + want + "'");
        if (name != want) bad(std::string("expected item '") + want + "', the case has '" + name + "'");
        if (bytes != (size_t)-1 && payload.size() != bytes)
            bad(std::string("item '") + want + "' has " + std::to_string(payload.size()) + " bytes, expected " +
                std::to_string(bytes));
    }
    uint64_t u64(const char* want) { expect(want, 8); uint64_t v; memcpy(&v, payload.data(), 8); return v; }
    float f32(const char* want) { expect(want, 4); float v; memcpy(&v, payload.data(), 4); return v; }
    double f64(const char* want) { expect(want, 8); double v; memcpy(&v, payload.data(), 8); return v; }
    bool flag(const char* want) { return u64(want) != 0; }
    // The raw payload of an item of any length.
    std::vector<uint8_t> bytes(const char* want) { expect(want, (size_t)-1); return payload; }
};

struct Out {
    FILE* f;
    explicit Out(const char* path) : f(fopen(path, "wb")) {
        if (!f) { fprintf(stderr, "fuzz driver: cannot create %s\n", path); exit(2); }
    }
    void put(const char* name, const void* data, uint64_t n) {
        const uint8_t len = (uint8_t)strlen(name);
        fwrite(&len, 1, 1, f);
        fwrite(name, 1, len, f);
        fwrite(&n, 8, 1, f);
        if (n) fwrite(data, 1, n, f);
    }
    void u64(const char* name, uint64_t v) { put(name, &v, 8); }
    void f32(const char* name, float v) { put(name, &v, 4); }
    void f64(const char* name, double v) { put(name, &v, 8); }
};

// A view of `n` elements of T starting at element `off` of a 256-byte aligned allocation (with a
// guard of one element after the end). Inputs come from the case; outputs start as a poison byte
// pattern, so an element a kernel forgot to write shows up as a mismatch.
template <class T> struct View {
    std::vector<uint8_t> raw;
    uint64_t n = 0, off = 0;
    T* p = nullptr;
    View() = default;
    View(uint64_t n_, uint64_t off_, uint8_t poison) { alloc(n_, off_, poison); }
    // A copy is a separate allocation with the same contents, offset and alignment.
    View(const View& o) { *this = o; }
    View& operator=(const View& o) {
        if (this != &o) {
            alloc(o.n, o.off, 0);
            if (n) memcpy(p, o.p, bytes());
        }
        return *this;
    }
    View(View&&) = default;
    View& operator=(View&&) = default;
    void alloc(uint64_t n_, uint64_t off_, uint8_t poison) {
        n = n_;
        off = off_;
        raw.assign((n + off + 1) * sizeof(T) + 512, poison);
        const uintptr_t base = ((uintptr_t)raw.data() + 255) & ~(uintptr_t)255;
        p = reinterpret_cast<T*>(base) + off;
    }
    uint64_t bytes() const { return n * sizeof(T); }
    bool aligned16() const { return ((uintptr_t)p & 15) == 0; }
};

// An input array written by the Rust side's `view(name, data, off)`.
template <class T> View<T> in_view(In& in, const char* name) {
    in.expect(name, (size_t)-1);
    if (in.payload.size() < 8 || (in.payload.size() - 8) % sizeof(T)) in.bad("bad view payload");
    uint64_t off;
    memcpy(&off, in.payload.data(), 8);
    View<T> v((in.payload.size() - 8) / sizeof(T), off, 0);
    if (v.n) memcpy(v.p, in.payload.data() + 8, v.bytes());
    return v;
}

template <class T> void put(Out& out, const char* name, const View<T>& v) { out.put(name, v.p, v.bytes()); }
template <class T> void put(Out& out, const char* name, const std::vector<T>& v) {
    out.put(name, v.data(), v.size() * sizeof(T));
}

void run_case(In& in, Out& out);

int main(int argc, char** argv) {
    if (argc != 3) { fprintf(stderr, "usage: %s CASES OUTPUTS\n", argv[0]); return 2; }
    In in(argv[1]);
    Out out(argv[2]);
    while (in.item()) {
        if (in.name != "case" || in.payload.size() != 8) in.bad("expected item 'case'");
        uint64_t index;
        memcpy(&index, in.payload.data(), 8);
        out.u64("case", index);
        run_case(in, out);
        in.expect("end", 0);
        out.put("end", nullptr, 0);
        fflush(out.f);  // a case that hangs or crashes leaves every earlier case readable
    }
    return 0;
}
