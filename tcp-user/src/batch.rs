//! Batched map access (`BPF_MAP_LOOKUP_BATCH`, `BPF_MAP_UPDATE_BATCH`, kernel 5.6): a few
//! thousand elements per syscall instead of one or two syscalls each.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `bpf(2)` with a batch command; the count the kernel answered, and the error if it failed.
fn batch(cmd: libc::c_long, attr: &mut BatchAttr) -> (u32, Option<io::Error>) {
    // SAFETY: `attr` is a valid bpf_attr prefix of the size passed; the callers make its
    // pointers valid for what the command reads and writes (see each).
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, &raw mut *attr, size_of::<BatchAttr>()) };
    (attr.count, (rc != 0).then(io::Error::last_os_error))
}

/// Every element of hash map `fd`, appended to `out`.
///
/// # Safety
/// `K` and `V` are the map's own key and value types: plain data (any bit pattern valid) of
/// exactly the map's key and value sizes. The kernel writes that many bytes per element.
///
/// # Errors
/// When the kernel refuses the read.
pub unsafe fn lookup<K: Copy, V: Copy>(
    fd: BorrowedFd<'_>,
    out: &mut Vec<(K, V)>,
) -> io::Result<()> {
    let (key_size, value_size) = (size_of::<K>(), size_of::<V>());
    let mut each = |keys: &[u8], values: &[u8]| {
        for (k, v) in keys
            .chunks_exact(key_size)
            .zip(values.chunks_exact(value_size))
        {
            // SAFETY: `k` and `v` hold one element's key and value as the kernel wrote them,
            // and K and V are plain data of exactly these sizes (caller).
            let element = unsafe {
                (
                    k.as_ptr().cast::<K>().read_unaligned(),
                    v.as_ptr().cast::<V>().read_unaligned(),
                )
            };
            out.push(element);
        }
    };
    // SAFETY: the sizes are the map's (caller).
    match unsafe { scan(fd, key_size, value_size, usize::MAX, &mut each) }? {
        true => Ok(()),
        // Only a bucket of more than a chunk's elements stops an unlimited scan.
        false => Err(io::Error::from_raw_os_error(libc::ENOSPC)),
    }
}

/// The keys of hash map `fd`, packed (`key_size` bytes each), appended to `out`, if it holds
/// at most `limit` elements: `Ok(false)` (with some keys appended) when it holds more.
///
/// The kernel skips an empty bucket without taking its lock or leaving its RCU section, about
/// 2 ns a bucket where a program's `bpf_for_each_map_elem` spends about 16 (see
/// `tcp-user/src/reaper.rs`).
///
/// # Safety
/// `key_size` and `value_size` are the map's own key and value sizes (the kernel writes that
/// many bytes per element).
///
/// # Errors
/// When the kernel refuses the read.
pub unsafe fn keys(
    fd: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
    limit: usize,
    out: &mut Vec<u8>,
) -> io::Result<bool> {
    // SAFETY: the sizes are the map's (caller).
    unsafe {
        scan(fd, key_size, value_size, limit, &mut |keys, _| {
            out.extend_from_slice(keys)
        })
    }
}

/// Reads hash map `fd` with `BPF_MAP_LOOKUP_BATCH`, a chunk at a time, handing `each` the
/// keys and values of every chunk (packed, of the given sizes); stops with `Ok(false)` once
/// more than `limit` elements were read, or when the next bucket holds more than the room
/// left below the limit; `Ok(true)` at the end of the map.
///
/// # Safety
/// `key_size` and `value_size` are the map's own key and value sizes.
unsafe fn scan(
    fd: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
    limit: usize,
    each: &mut dyn FnMut(&[u8], &[u8]),
) -> io::Result<bool> {
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    const CHUNK: usize = 4096;
    // One more than the limit, to tell "exactly `limit`" from "more".
    let chunk = limit.saturating_add(1).min(CHUNK);
    let mut keys = vec![0u8; chunk * key_size];
    let mut values = vec![0u8; chunk * value_size];
    // A hash map's cursor is a bucket index.
    let mut cursor: u32 = 0;
    let mut first = true;
    let mut found = 0usize;
    loop {
        let want = limit.saturating_add(1).saturating_sub(found).min(chunk);
        let mut next: u32 = 0;
        // `keys` and `values` hold `chunk` >= `want` elements of the map's sizes.
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { (&raw const cursor) as u64 },
            out_batch: (&raw mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: want as u32,
            map_fd: fd.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        let (n, error) = batch(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = (n as usize).min(want);
        each(&keys[..n * key_size], &values[..n * value_size]);
        found += n;
        if found > limit {
            return Ok(false);
        }
        match error {
            None => {}
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(true),
            // The next bucket holds more than the `want` elements left below the limit.
            Some(e) if e.raw_os_error() == Some(libc::ENOSPC) => return Ok(false),
            Some(e) => return Err(e),
        }
        cursor = next;
        first = false;
    }
}

/// Stores `count` keys and values, packed (the map's key and value sizes), into map `fd`.
///
/// # Safety
/// `keys` and `values` hold at least `count` keys and values of the map's key and value sizes
/// (the kernel reads that many bytes from them).
///
/// # Errors
/// When the kernel refuses: how many it stored, and why.
pub unsafe fn update(
    fd: BorrowedFd<'_>,
    keys: &[u8],
    values: &[u8],
    count: usize,
) -> Result<(), (u32, io::Error)> {
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    let count = u32::try_from(count).map_err(|e| (0, io::Error::other(e)))?;
    // The kernel reads `count` keys and values from the slices, which outlive the call.
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count,
        map_fd: fd.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    match batch(BPF_MAP_UPDATE_BATCH, &mut attr) {
        (_, None) => Ok(()),
        (stored, Some(e)) => Err((stored, e)),
    }
}
