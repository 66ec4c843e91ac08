/* A window of a JPEG, decoded at a reduced scale, through libjpeg-turbo's libjpeg API:
 * scaled IDCT (scale_num / 8), jpeg_crop_scanline for the columns and jpeg_skip_scanlines for
 * the rows above the window; the rows below it are never decoded. libjpeg reports errors by
 * calling error_exit, which here jumps back to the caller with the message; nothing unwinds
 * through Rust frames. */
#include <setjmp.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include <jpeglib.h>
#include <jerror.h>

struct taming_error {
    struct jpeg_error_mgr mgr;
    jmp_buf jump;
    int truncated;
    char message[JMSG_LENGTH_MAX];
};

static void taming_error_exit(j_common_ptr cinfo) {
    struct taming_error *err = (struct taming_error *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
}

/* A file that ends before its last scanline is an error; other warnings (corrupt data that
 * libjpeg decodes anyway, as PIL does) are counted, not printed. */
static void taming_emit_message(j_common_ptr cinfo, int msg_level) {
    if (msg_level >= 0) return;
    if (cinfo->err->msg_code == JWRN_JPEG_EOF) {
        ((struct taming_error *)cinfo->err)->truncated = 1;
        (*cinfo->err->error_exit)(cinfo);
    }
    cinfo->err->num_warnings++;
}

static void copy_message(const char *from, char *to, size_t len) {
    if (len == 0) return;
    strncpy(to, from, len - 1);
    to[len - 1] = '\0';
}

/* The window to decode, in the coordinates of the image scaled by scale_num / 8. */
struct taming_window {
    unsigned scale_num;
    unsigned x, y, width, height;
};

/* Decodes `window` as RGB rows into `out` (at most `out_len` bytes), allocating at most
 * `max_memory` bytes inside libjpeg. libjpeg widens the window's columns to whole iMCUs: on
 * return `window->x` and `window->width` are the columns decoded, and each row in `out` is
 * 3 * width bytes. 0 on success, else `message` and -2 for a file that ends before the
 * window's last row, -1 for any other error. */
int taming_jpeg_decode_window(const unsigned char *data, unsigned long len,
                              struct taming_window *window, unsigned char *out, size_t out_len,
                              long max_memory, char *message, size_t message_len) {
    struct jpeg_decompress_struct cinfo;
    struct taming_error err;
    JDIMENSION xoffset, width, row;
    JSAMPROW line;
    size_t stride;
    cinfo.err = jpeg_std_error(&err.mgr);
    err.mgr.error_exit = taming_error_exit;
    err.mgr.emit_message = taming_emit_message;
    err.truncated = 0;
    if (setjmp(err.jump)) {
        copy_message(err.message, message, message_len);
        jpeg_destroy_decompress(&cinfo);
        return err.truncated ? -2 : -1;
    }
    jpeg_create_decompress(&cinfo);
    cinfo.mem->max_memory_to_use = max_memory;
    jpeg_mem_src(&cinfo, data, len);
    jpeg_read_header(&cinfo, TRUE);
    cinfo.out_color_space = JCS_RGB;
    cinfo.scale_num = window->scale_num;
    cinfo.scale_denom = 8;
    jpeg_start_decompress(&cinfo);
    if (cinfo.output_components != 3 || window->width == 0 || window->height == 0 ||
        window->width > cinfo.output_width || window->height > cinfo.output_height ||
        window->x > cinfo.output_width - window->width ||
        window->y > cinfo.output_height - window->height) {
        copy_message("window outside the scaled image", message, message_len);
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    xoffset = window->x;
    width = window->width;
    jpeg_crop_scanline(&cinfo, &xoffset, &width);
    stride = (size_t)cinfo.output_width * 3;
    if (stride * window->height > out_len) {
        copy_message("the widened window does not fit its buffer", message, message_len);
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    if (window->y > 0 && jpeg_skip_scanlines(&cinfo, window->y) != window->y) {
        copy_message("fewer rows than the header says", message, message_len);
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    for (row = 0; row < window->height; row++) {
        line = out + row * stride;
        if (jpeg_read_scanlines(&cinfo, &line, 1) != 1) {
            copy_message("fewer rows than the header says", message, message_len);
            jpeg_destroy_decompress(&cinfo);
            return -1;
        }
    }
    window->x = xoffset;
    window->width = cinfo.output_width;
    jpeg_abort_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    return 0;
}
